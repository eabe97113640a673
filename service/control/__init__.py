"""The control plane: client keys, run-time routes and critic activations, stored in the database,
audited, and reloaded by every replica (service.control.plane)."""
