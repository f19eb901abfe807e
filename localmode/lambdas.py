"""Run the template's Lambda handlers in this process, as the Lambda service would call them."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from botocore.exceptions import ClientError

from localmode import iam

# Lambda's quota: "total size of all environment variables" at most 4 KB, measured as the JSON of the map.
ENVIRONMENT_LIMIT_BYTES = 4096


# Held while an invocation swaps os.environ, and while any client is built (localmode.cloud wraps botocore's
# create_client), since building one iterates the environment: a key removed mid-iteration raises KeyError.
# Re-entrant: building a client may build another (credential providers).
ENVIRON_LOCK = threading.RLock()


def environment_size(variables: dict[str, str]) -> int:
    """Bytes of the environment as Lambda measures it (the compact JSON of the variables)."""
    return len(json.dumps(variables, separators=(",", ":"), ensure_ascii=False).encode())


def check_environment_size(function_name: str, variables: dict[str, str]) -> None:
    """Refuse an environment over Lambda's 4 KB limit with the error CreateFunction gives.

    Raises
    ------
    botocore.exceptions.ClientError
        ``InvalidParameterValueException``, Lambda's code and message for this case.
    """
    measured = json.dumps(variables, separators=(",", ":"), ensure_ascii=False)
    if environment_size(variables) > ENVIRONMENT_LIMIT_BYTES:
        message = ("Lambda was unable to configure your environment variables because the environment variables "
                   f"you have provided exceeded the 4KB limit. String measured: {measured}")
        raise ClientError({"Error": {"Code": "InvalidParameterValueException", "Message": message},
                           "ResponseMetadata": {"HTTPStatusCode": 400}}, "CreateFunction")


@dataclass
class FunctionSpec:
    """What local mode knows of one ``AWS::Serverless::Function``."""

    logical_id: str
    name: str
    arn: str
    code_dir: Path
    handler: str
    environment: dict[str, str]
    timeout: int
    memory_mb: int
    invocations: list[dict[str, Any]] = field(default_factory=list)


class _Context:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    def __init__(self, spec: FunctionSpec):
        self.function_name = spec.name
        self.function_version = "$LATEST"
        self.invoked_function_arn = spec.arn
        self.memory_limit_in_mb = spec.memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{spec.name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self._deadline = time.monotonic() + spec.timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class _LogSink(io.TextIOBase):
    """The stdout handlers see; forwards to the current runtime's log file.

    Powertools binds its stream handler once per process, so successive local clouds (as in tests) must share
    one stream object whose destination changes.
    """

    target: io.TextIOBase | None = None

    def write(self, text: str) -> int:
        if self.target is not None and not self.target.closed:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        if self.target is not None and not self.target.closed:
            self.target.flush()


_SINK = _LogSink()


class LambdaRuntime:
    """Imports each handler once, in its own module namespace, with its function's environment.

    Handlers read their configuration from ``os.environ`` at import and create clients at module level, as on
    Lambda; one process hosts them all, so an invocation holds a lock while the environment is its function's.

    Parameters
    ----------
    base_env : dict
        Variables the Lambda runtime sets for every function (region, Powertools switches).
    log_dir : Path
        The functions' output (Powertools' JSON logs, EMF metrics) goes to ``<log_dir>/lambda.log``: Powertools
        binds its handler to the stdout it sees first, and functions of one service share that logger.
    """

    def __init__(self, base_env: dict[str, str], log_dir: Path):
        self.functions: dict[str, FunctionSpec] = {}
        self._modules: dict[str, ModuleType] = {}
        self._base_env = base_env
        self._lock = threading.RLock()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "lambda.log"
        self._log_file = self.log_path.open("a", buffering=1)
        _SINK.target = self._log_file

    def register(self, spec: FunctionSpec) -> None:
        """Make a function invocable by name, ARN or logical id."""
        self.functions[spec.name] = spec

    def find(self, name_or_arn: str) -> FunctionSpec:
        """Look a function up the way Lambda's Invoke accepts it (name, ARN, partial ARN, with a qualifier)."""
        name = name_or_arn
        if name.startswith("arn:"):
            name = name.split(":")[6]
        for spec in self.functions.values():
            if name in (spec.name, spec.logical_id):
                return spec
        raise KeyError(f"no function {name_or_arn!r} in the template")

    @contextlib.contextmanager
    def _as_function(self, spec: FunctionSpec) -> Any:
        with ENVIRON_LOCK:
            saved = dict(os.environ)
            os.environ.update(self._base_env)
            os.environ.update(spec.environment)
            os.environ["AWS_LAMBDA_FUNCTION_NAME"] = spec.name
            os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(spec.memory_mb)
        try:
            with contextlib.redirect_stdout(_SINK):
                yield
        finally:
            with ENVIRON_LOCK:
                os.environ.clear()
                os.environ.update(saved)

    def _module(self, spec: FunctionSpec) -> ModuleType:
        module = self._modules.get(spec.logical_id)
        if module is not None:
            return module
        module_file, _, _ = spec.handler.rpartition(".")
        path = spec.code_dir / (module_file.replace(".", "/") + ".py")
        mod_name = f"_lambda_{spec.logical_id}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(spec.code_dir))
        try:
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(spec.code_dir))
        self._modules[spec.logical_id] = module
        return module

    def invoke(self, name_or_arn: str, event: Any) -> tuple[bool, Any]:
        """Call the handler; return ``(ok, payload)`` where a failure's payload is Lambda's error document."""
        spec = self.find(name_or_arn)
        with self._lock, self._as_function(spec), iam.as_function(spec.logical_id):
            record: dict[str, Any] = {"event": event, "started": time.time()}
            spec.invocations.append(record)
            try:
                module = self._module(spec)
                handler = getattr(module, spec.handler.rpartition(".")[2])
                result = handler(event, _Context(spec))
                payload = json.loads(json.dumps(result, default=str))
                record.update(ok=True, result=payload)
                return True, payload
            except Exception as err:  # noqa: BLE001 - reported to the caller the way Lambda reports it
                error = {
                    "errorMessage": str(err),
                    "errorType": type(err).__name__,
                    "requestId": "",
                    "stackTrace": traceback.format_exception(err)[-5:],
                }
                print(json.dumps({"level": "ERROR", "unhandled": error}), flush=True)
                record.update(ok=False, error=error)
                return False, error
            finally:
                record["seconds"] = time.time() - record["started"]

    def close(self) -> None:
        """Close the shared log file."""
        self._log_file.close()
