"""The operator side: running TorchServe on a model store, talking to it (client, management API),
telling when it is ready, and stopping it without losing accepted requests."""
