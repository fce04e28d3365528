"""Code shared by every component: config, AWS clients, stream IO, leases, the event model."""
