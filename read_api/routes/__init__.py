"""The query API's routes, one module per resource; `read_api.app` assembles them."""
