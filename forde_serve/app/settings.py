"""The HTTP service's settings: typed, validated once, before anything is served.

Each setting comes from `bentoml serve ... --arg NAME=VALUE` (BentoML's `use_arguments`), else from
the environment variable `FORDE_<NAME>`, else its default. `forde serve` sets the variables.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from forde_serve.errors import FordeError

__all__ = ["DEFAULT_MODEL", "ServeSettings", "SettingsError"]

# exported/digits.onnx beside the package: the repository's (and a Bento's) default model
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "exported" / "digits.onnx"
_PREFIX = "FORDE_"


class SettingsError(FordeError, ValueError):
    """A service setting that cannot be used; the message names the variable or argument."""


class ServeSettings(BaseModel):
    """How the service runs; every field is `FORDE_<FIELD>` in the environment (upper case)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(DEFAULT_MODEL, description="the exported NAME.onnx to serve (NAME.explain.onnx beside it)")
    max_inputs: int = Field(256, ge=1, le=4096, description="rows per request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body, bytes")
    batching: bool = Field(True, description="adaptive batching of /predict (false: one call per request)")
    workers: int = Field(1, ge=1, le=64, description="worker processes behind the one port")
    threads: int | None = Field(
        None, ge=1, le=256, description="onnxruntime intra-op threads per worker (default: the cores / workers)"
    )
    # Spinning onnxruntime threads compete with the event loop that parses and answers requests.
    spin: bool = Field(False, description="let idle onnxruntime threads spin-wait (pays only on dedicated cores)")
    # Watching the traffic: the shift test, ids and labels, adaptive sets. Its state is in the store that
    # FORDE_STATE_URL / FORDE_STATE_DIR name (forde_serve.monitoring.store), shared by every worker.
    monitor: bool = Field(True, description="watch the traffic: shift alarm, prediction ids, labels, adaptive sets")
    admin_token: SecretStr | None = Field(
        None, description="when set, /feedback and the alarm reset need `Authorization: Bearer <token>`"
    )
    delta: float = Field(0.01, gt=0.0, lt=1.0, description="the shift alarm's false-alarm bound (alarm at 1/delta)")
    gamma: float = Field(0.01, gt=0.0, le=1.0, description="adaptive conformal inference's step per label")
    window: int = Field(200, ge=1, le=100_000, description="newest rows the /monitor window estimates average over")
    keep_inputs: bool = Field(False, description="store each row's raw input with its prediction (off: never)")

    @classmethod
    def load(cls, arguments: dict | None = None, environ: dict | None = None) -> ServeSettings:
        """The settings from BentoML's `--arg`s (`arguments`; default: `bentoml.use_arguments()`) over
        `FORDE_*` variables (`environ`; default: os.environ) over the defaults."""
        if arguments is None:
            import bentoml

            arguments = vars(bentoml.use_arguments())
        environ = os.environ if environ is None else environ
        values, origin = {}, {}
        for name in cls.model_fields:
            variable = _PREFIX + name.upper()
            if environ.get(variable):
                values[name], origin[name] = environ[variable], variable
        unknown = sorted(set(arguments) - set(cls.model_fields))
        if unknown:
            raise SettingsError(
                f"--arg {unknown[0]}: not a forde-serve setting; expected one of {', '.join(cls.model_fields)}"
            )
        for name, value in arguments.items():
            values[name], origin[name] = value, f"--arg {name}"
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "settings"
            raise SettingsError(
                f"{origin.get(name, name)}: {first['msg'].lower()}, got {first.get('input')!r}"
            ) from None

    def token(self) -> str | None:
        """The admin token (None: write endpoints are open)."""
        return None if self.admin_token is None else self.admin_token.get_secret_value()

    def onnx_threads(self) -> int:
        """Intra-op threads per worker: `threads`, or the cores shared evenly among the workers."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def environment(self) -> dict[str, str]:
        """These settings as the `FORDE_*` variables that give them back (for a server started as a child)."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[_PREFIX + name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out
