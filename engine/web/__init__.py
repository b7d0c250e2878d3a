"""The HTTP layer of ``fiona serve``: the REST API under ``/api/v1`` (site config ``web``).

Starlette on uvicorn. A route parses the request, checks who may do it (declared once, in the
route table of :mod:`engine.web.api`), calls the function the matching CLI command calls, and
renders JSON. No logic of the engine lives here.
"""
