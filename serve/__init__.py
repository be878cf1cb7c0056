"""Ray Serve application: sampler replicas behind an HTTP API."""
