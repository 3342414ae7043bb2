"""The HTTP API's routers, one per resource: `upscale`, `jobs`, `models` and `operations` (health, readiness,
metrics, the page). Thin: they read the request, call plain modules, and shape the answer."""
