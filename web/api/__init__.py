"""HTTP routes, one module per area; each route translates, calls one service, maps the result."""
