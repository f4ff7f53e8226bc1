"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""
import json
import re

from pydantic import ValidationError
from starlette.responses import Response


BODY_NOT_READ = frozenset({408, 413})


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        # ASCII escapes: a message may quote what the client sent, which can hold text UTF-8 cannot encode
        # a body refused before it was all read (too large, too slow) leaves the connection unusable: it closes
        headers = {"connection": "close"} if self.status in BODY_NOT_READ else None
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


# how pydantic names the members of a union it tried, in an error's location: not a field a client sent
UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z-]+\[.*\])$")


def field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location if not UNION_MEMBER.match(str(part)))


def from_validation_error(error: ValidationError) -> APIError:
    """The problems pydantic found, with the field of the first as `param`. A union reports one error per
    member it tried: our own checks' messages (value errors) come first, as they say most."""
    errors = sorted(error.errors(), key=lambda e: e["type"] != "value_error")
    problems = "; ".join(f"{field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return APIError(400, problems, param=field_path(errors[0]["loc"]) or None)
