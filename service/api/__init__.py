"""REST API: FastAPI app, routes, schemas and the error table."""
