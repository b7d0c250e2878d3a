"""The OpenAPI 3 document of ``/api/v1``, built from the route table (:data:`ROUTES`), so a
route cannot exist without being described."""

from __future__ import annotations

import re
from typing import Any

from engine import __version__
from engine.web.api import ROUTES, Route
from engine.web.auth import Need

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error", "fix"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong"},
        "fix": {"type": "string", "description": "what to do about it"},
    },
}
_ERRORS = {
    "400": "Bad request: a parameter is malformed",
    "401": "No valid API token",
    "403": "The user's role or project grants do not allow this",
    "404": "No such item",
}
_NEEDS = {
    Need.READ: "Any user (admin, coordinator, viewer).",
    Need.ACT: "An admin, or a coordinator of the item's project.",
    Need.ADMIN: "An admin.",
}


def _operation(route: Route) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    params += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in route.query
    ]
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
    }
    for code, text in _ERRORS.items():
        responses[code] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    if route.method == "POST" and not route.upload:
        responses["409"] = responses["404"] | {"description": "The item's state forbids this"}
    if route.upload:
        responses["413"] = responses["404"] | {"description": "The upload is too large"}
        responses["422"] = responses["404"] | {"description": "The upload is not DICOM"}
    op: dict[str, Any] = {
        "summary": route.summary,
        "description": _NEEDS[route.need],
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z]+', '_', route.path).strip('_')}",
        "parameters": params,
        "responses": responses,
    }
    if route.body:
        props = {name: {"type": "string"} for name in route.body}
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "properties": props}}},
        }
    if route.upload:
        op["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                }
            },
        }
    return op


def openapi_document() -> dict[str, Any]:
    """The document served at ``/api/v1/openapi.json``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault("/api/v1" + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fiona web API",
            "version": __version__,
            "description": "Every action of the fiona command line, over HTTP. Authenticate"
            " with 'Authorization: Bearer TOKEN' (fiona user token NAME).",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
