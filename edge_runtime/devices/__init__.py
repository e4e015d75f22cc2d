"""Device drivers: one module per kind of device, each library behind exactly one module."""
