"""The HTTP API's routers, one per resource: `upscale`, `jobs`, `models` and `operations` (health, readiness,
metrics); the page at `/` is `service.page`'s. Thin: they read the request, call plain modules, shape the answer."""
