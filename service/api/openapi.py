"""The OpenAPI document: FastAPI's, plus the models of bodies a route reads raw (the chat request)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    fastapi_document = app.openapi

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = fastapi_document()  # caches itself in app.openapi_schema
        _, defs = models_json_schema([(m, "validation") for m in models],
                                     ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        return doc

    app.openapi = build  # type: ignore[method-assign]
