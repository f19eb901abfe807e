"""``python -m localmode up``: the stack deployed locally and served over HTTP, for the AWS CLI and boto3.

:class:`LocalCloud` deploys template.yaml into moto in this process and hooks moto's backends (S3 uploads reach the
local EventBridge bus, put-events too, model package approvals start the deployment, InvokeEndpoint reaches the
real serving processes). This module serves the same in-memory backends over HTTP with moto's own werkzeug
application, so a request from ``aws --endpoint-url`` or ``boto3.client(..., endpoint_url=...)`` goes through every
one of those hooks, exactly as the handlers' in-process calls do. Requests over HTTP act as the operator: IAM
(localmode/iam.py) checks what the functions, state machines and jobs do, not what the operator asks.

Besides AWS's APIs the port answers ``GET /_localmode/health`` (200 once ready, 503 before),
``GET /_localmode/resources`` (the stack's outputs as JSON), ``GET /_localmode/env`` (the exports, for ``eval``)
and ``POST /_localmode/fire/<rule>`` (deliver a ``Scheduled Event`` to a schedule rule now, e.g.
``DetectDriftFunctionHourly``). Schedules also fire on their own (``cron(...)``/``rate(...)`` in UTC) while ``up``
runs, unless ``--no-schedules``.

Nothing is persisted: stopping ``up`` discards every bucket, table, execution, model package and endpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from localmode.cloud import ACCOUNT, REGION, REPO_ROOT

log = logging.getLogger("localmode.server")

HEALTH_PATH = "/_localmode/health"
RESOURCES_PATH = "/_localmode/resources"
ENV_PATH = "/_localmode/env"
FIRE_PREFIX = "/_localmode/fire/"
DEFAULT_PORT = 4566
DEFAULT_WORK_DIR = REPO_ROOT / ".local" / "up"
# What a shell needs besides AWS_ENDPOINT_URL: moto accepts any key; "testing" keeps the default account.
SHELL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
# After this long, a shutdown that is still waiting kills what is left and exits.
SHUTDOWN_DEADLINE_S = 90.0


def say(text: str) -> None:
    """Progress on the real stderr (handlers' stdout is redirected while they run, process-wide)."""
    stream = sys.__stderr__
    if stream is not None:
        stream.write(text + "\n")
        stream.flush()


def env_name(output: str) -> str:
    """A template output's name as a shell variable: ``DataBucketName`` -> ``DATA_BUCKET_NAME``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", output).upper()


# ------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (children, grandchildren...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: the fields after its last ")" are fixed.
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants(grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process this one started (and theirs), SIGKILL what is left after ``grace_s``."""
    pids = descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]:
                return pids
            time.sleep(0.1)
    return pids


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].startswith("Z")


ALARM_EVALUATION_S = 10.0


# ------------------------------------------------------------------ schedules
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (1, 7), (1970, 2199)]
_MONTHS = {m: i + 1 for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN",
                                                 "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])}
_DAYS = {d: i + 1 for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}


def _cron_field(text: str, low: int, high: int, names: dict[str, int]) -> set[int] | None:
    """The values one EventBridge cron field allows (None: any, for ``*`` and ``?``)."""
    if text in ("*", "?"):
        return None
    values: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base in ("*", ""):
            start, end = low, high
        elif "-" in base:
            a, b = base.split("-", 1)
            start, end = names.get(a.upper()) or int(a), names.get(b.upper()) or int(b)
        else:
            start = names.get(base.upper()) or int(base)
            end = high if step else start
        values.update(range(start, end + 1, int(step) if step else 1))
    return values


class Schedule:
    """When a schedule rule fires: ``rate(N unit)`` from ``up``'s start, or a 6-field ``cron(...)`` in UTC.

    The cron subset is numbers, names, lists, ranges and steps (not ``L``, ``W`` or ``#``); a rule whose
    expression is outside it is only fired on demand.
    """

    def __init__(self, expression: str, started: datetime):
        self.expression = expression
        self.period: timedelta | None = None
        self.fields: list[set[int] | None] | None = None
        rate = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression.strip())
        cron = re.fullmatch(r"cron\((.+)\)", expression.strip())
        if rate:
            unit = rate.group(2).rstrip("s") + "s"
            self.period = timedelta(**{unit: int(rate.group(1))})
            self.next = started + self.period
        elif cron:
            parts = cron.group(1).split()
            if len(parts) != 6 or any(c in cron.group(1) for c in "LW#"):
                raise ValueError(f"unsupported schedule {expression}")
            names = [{}, {}, {}, _MONTHS, _DAYS, {}]
            self.fields = [_cron_field(p, lo, hi, n) for p, (lo, hi), n in zip(parts, _CRON_RANGES, names,
                                                                              strict=True)]
            self.next = self._after(started)
        else:
            raise ValueError(f"unsupported schedule {expression}")

    def _matches(self, t: datetime) -> bool:
        assert self.fields is not None
        weekday = (t.isoweekday() % 7) + 1  # EventBridge: 1 is Sunday
        values = [t.minute, t.hour, t.day, t.month, weekday, t.year]
        return all(allowed is None or value in allowed for allowed, value in zip(self.fields, values, strict=True))

    def _after(self, t: datetime) -> datetime:
        candidate = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(60 * 24 * 366):
            if self._matches(candidate):
                return candidate
            candidate += timedelta(minutes=1)
        return datetime.max.replace(tzinfo=UTC)

    def due(self, now: datetime) -> bool:
        """True (and the next time computed) when the schedule's time has come."""
        if now < self.next:
            return False
        self.next = self.next + self.period if self.period else self._after(now)
        return True


# ------------------------------------------------------------------ HTTP
def _json_protocol(environ: dict[str, Any]) -> bool:
    ctype = environ.get("CONTENT_TYPE", "")
    return "json" in ctype or bool(environ.get("HTTP_X_AMZ_TARGET"))


def aws_error(environ: dict[str, Any], start_response: Callable[..., Any], status: int, code: str,
              message: str) -> Iterable[bytes]:
    """An error shaped as the protocol of the request expects (JSON for JSON protocols, XML otherwise)."""
    reason = {400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
    if _json_protocol(environ):
        body = json.dumps({"__type": code, "message": message}).encode()
        headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", code)]
    else:
        from xml.sax.saxutils import escape

        body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{escape(code)}</Code>"
                f"<Message>{escape(message)}</Message></Error><RequestId>local</RequestId></ErrorResponse>").encode()
        headers = [("Content-Type", "text/xml")]
    start_response(f"{status} {reason.get(status, 'Error')}", [*headers, ("Content-Length", str(len(body)))])
    return [body]


def _json_response(start_response: Callable[..., Any], status: int, document: Any) -> Iterable[bytes]:
    body = json.dumps(document, indent=2, default=str).encode()
    start_response(f"{status} {'OK' if status == 200 else 'Error'}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Application:
    """The WSGI application on the port: ``/_localmode/*`` here, everything else to moto's dispatcher.

    Until :meth:`ready` is called every AWS request is answered ``503 ServiceUnavailable`` (the stack is still
    being deployed). An operation moto does not implement, or a service it lacks, is answered with an AWS-shaped
    error instead of a stack trace.
    """

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.moto = DomainDispatcherApplication(create_backend_app)
        self.cloud: Any = None
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self._ready = threading.Event()
        self.fire_lock = threading.Lock()
        self.exports = ""

    def ready(self, cloud: Any, exports: str) -> None:
        """Start answering: the stack is deployed; ``exports`` is what ``GET /_localmode/env`` gives a shell."""
        self.cloud = cloud
        self.exports = exports
        self.ready_after_s = round(time.monotonic() - self.started, 2)
        self._ready.set()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_localmode/"):
            return self._control(environ, start_response, path)
        if not self._ready.is_set():
            return aws_error(environ, start_response, 503, "ServiceUnavailable",
                             "local mode is still deploying the stack: wait for GET /_localmode/health to answer 200")
        try:
            return self.moto(environ, start_response)  # type: ignore[no-any-return,unused-ignore]
        except NotImplementedError as err:
            code = "UnknownOperationException" if _json_protocol(environ) else "InvalidAction"
            return aws_error(environ, start_response, 400, code,
                             f"local mode does not offer this operation: {err}")
        except Exception as err:  # noqa: BLE001 - an AWS-shaped answer instead of a stack trace
            log.error("request %s %s failed:\n%s", environ.get("REQUEST_METHOD"), path, traceback.format_exc())
            auth = environ.get("HTTP_AUTHORIZATION", "")
            scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", auth)
            service = scope.group(1) if scope else "this service"
            return aws_error(environ, start_response, 500, "InternalFailure",
                             f"local mode could not serve this request to {service} ({type(err).__name__}: {err}); "
                             "see the server log")

    def _control(self, environ: dict[str, Any], start_response: Callable[..., Any],
                 path: str) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if path == HEALTH_PATH:
            if not self._ready.is_set():
                return _json_response(start_response, 503, {"status": "starting"})
            return _json_response(start_response, 200, {"status": "ready", "pid": os.getpid(),
                                                        "ready_after_s": self.ready_after_s})
        if not self._ready.is_set():
            return _json_response(start_response, 503, {"status": "starting"})
        if path == RESOURCES_PATH:
            return _json_response(start_response, 200, resources(self.cloud))
        if path == ENV_PATH:
            body = self.exports.encode()
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        if path.startswith(FIRE_PREFIX) and method == "POST":
            name = path[len(FIRE_PREFIX):]
            status, document = fire(self.cloud, name, self.fire_lock)
            return _json_response(start_response, status, document)
        return _json_response(start_response, 404, {"message": f"no {method} {path} here; try {HEALTH_PATH}, "
                                                               f"{RESOURCES_PATH}, {ENV_PATH} or POST "
                                                               f"{FIRE_PREFIX}<rule>"})


def resources(cloud: Any) -> dict[str, Any]:
    """The stack's outputs, and the schedule rules that ``fire`` accepts."""
    outputs = {name: cloud.output(name) for name in cloud.template.get("Outputs", {})}
    return {"outputs": outputs, "schedules": {r.name: r.schedule for r in cloud.bus.rules if r.schedule},
            "work_dir": str(cloud.work_dir), "logs": str(cloud.runtime.log_path)}


def sync_capture(cloud: Any) -> int:
    """Copy the endpoints' captured records to ``monitoring/records/`` in the artifacts bucket, where the drift and
    quality checks read them (on AWS, Data Capture delivers them there; locally the container writes files).
    Returns the number of files copied."""
    import boto3

    files = sorted(Path(cloud.capture_dir).glob("*.jsonl")) if Path(cloud.capture_dir).is_dir() else []
    s3 = boto3.client("s3", region_name=REGION)
    for capture in files:
        s3.upload_file(str(capture), cloud.output("ArtifactsBucketName"), f"monitoring/records/{capture.name}")
    return len(files)


def fire(cloud: Any, name: str, lock: threading.Lock) -> tuple[int, dict[str, Any]]:
    """Deliver a ``Scheduled Event`` to the schedule rule ``name`` now; (HTTP status, answer)."""
    rules = [r for r in cloud.bus.rules if r.schedule]
    rule = next((r for r in rules if r.name == name), None) or next(
        (r for r in rules if r.name.lower() == name.lower()), None)
    if rule is None:
        return 404, {"message": f"no schedule rule {name!r}; there are: {', '.join(r.name for r in rules)}"}
    with lock:
        sync_capture(cloud)
        try:
            cloud.bus.fire_schedule(rule.name, account=ACCOUNT, region=REGION)
        except RuntimeError as err:
            return 409, {"rule": rule.name, "message": str(err)}
    delivery = rule.deliveries[-1] if rule.deliveries else {}
    answer: dict[str, Any] = {"rule": rule.name, "target": rule.target, "ok": bool(delivery.get("ok"))}
    if not delivery.get("ok"):
        answer["error"] = delivery.get("error")
    if rule.target_kind == "lambda":
        invocations = cloud.runtime.find(rule.target).invocations
        last = invocations[-1] if invocations else {}
        answer["result"] = last.get("result") if last.get("ok") else last.get("error")
    return 200, answer


# ------------------------------------------------------------------ the server
class LocalServer:
    """Bind the port, deploy the stack, serve, and stop everything it started.

    Parameters
    ----------
    port : int
        TCP port on ``host``.
    work_dir : Path
        LocalCloud's work directory (job directories, endpoint and handler logs).
    parameters : dict
        Template parameter overrides.
    host : str
        Address to bind (127.0.0.1: the emulator has no authentication worth the name).
    schedules : bool
        Fire schedule rules on their schedule.
    template : Path, optional
        Another template to deploy (tests); template.yaml by default.
    """

    def __init__(self, port: int, work_dir: Path, parameters: dict[str, str], host: str = "127.0.0.1",
                 schedules: bool = True, template: Path | None = None):
        self.port = port
        self.host = host
        self.work_dir = work_dir
        self.parameters = parameters
        self.schedules = schedules
        self.template = template
        self.cloud: Any = None
        self.server: Any = None
        self.app: Application | None = None
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._undo: list[Callable[[], None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bind(self) -> None:
        """Take the port (first, so that a port in use fails before anything starts).

        Raises
        ------
        ToolError
            The port is in use or cannot be bound.
        """
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        from tools.cli import ToolError

        self.app = Application()
        try:
            self.server = make_server(self.host, self.port, self.app, threaded=True,
                                      request_handler=MotoRequestHandler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ToolError(f"port {self.port} on {self.host} is already in use (another `python -m localmode "
                                "up`, or LocalStack?): stop it, or pick a free one with --port N") from None
            raise ToolError(f"cannot listen on {self.host}:{self.port}: {err.strerror or err}") from None
        except SystemExit:
            # werkzeug exits when a port is taken on some platforms
            raise ToolError(f"port {self.port} on {self.host} is already in use: stop what holds it, or pick a "
                            "free one with --port N") from None
        self.port = int(self.server.server_address[1])
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="localmode-http", daemon=True)
        thread.start()
        self._threads.append(thread)

    def deploy(self) -> Any:
        """Start LocalCloud (template.yaml deployed into moto, the hooks installed).

        Raises
        ------
        ToolError
            The template does not load, or a resource cannot be created.
        """
        from localmode import cloud as cloud_module
        from tools.cli import ToolError

        original_load = cloud_module.load_template
        if self.template is not None:
            template = self.template
            cloud_module.load_template = lambda _path: original_load(template)  # type: ignore[assignment]
        name = self.template or REPO_ROOT / "template.yaml"
        try:
            self.cloud = cloud_module.LocalCloud(work_dir=self.work_dir, parameters=self.parameters)
        except Exception as err:  # noqa: BLE001 - any failure to read the template is the operator's to fix
            raise ToolError(f"{name} failed to load ({type(err).__name__}: {err}): fix it (`sam validate --lint` "
                            "helps) and run up again") from None
        finally:
            cloud_module.load_template = original_load
        try:
            self.cloud.start()
        except Exception as err:  # noqa: BLE001 - reported in one line, the half-deployed stack torn down
            log.debug("deployment failed", exc_info=True)
            raise ToolError(f"{name} failed to deploy locally ({type(err).__name__}: {err}); fix it and run up "
                            "again") from None
        return self.cloud

    def load(self, data: Path, metadata: Path | None) -> dict[str, int]:
        """Upload a dataset through the data bucket (each image validated by the real handler); manifest counts."""
        import boto3

        from localmode.cloud import REGION as region
        from tools.upload_dataset import upload_dataset

        images = data / "images" if (data / "images").is_dir() else data
        metadata = metadata or next(iter(sorted(data.glob("*.csv"))), None)  # as `run` finds it
        bucket = self.cloud.output("DataBucketName")
        say(f"loading {images} into s3://{bucket}/incoming/ (each upload is validated)...")
        upload_dataset(boto3.client("s3", region_name=region), bucket, images, metadata, dataset="sample",
                       progress=False)
        self.cloud.bus.drain()
        table = boto3.resource("dynamodb", region_name=region).Table(self.cloud.output("ManifestTableName"))
        counts: dict[str, int] = {}
        for item in table.scan()["Items"]:
            counts[str(item.get("status"))] = counts.get(str(item.get("status")), 0) + 1
        return counts

    def announce(self) -> str:
        """The ready line, the exports and the resource names (also returned, for tests)."""
        assert self.app is not None
        exports = [f"export AWS_ENDPOINT_URL={self.url}"]
        exports += [f"export {k}={v}" for k, v in SHELL_CREDENTIALS.items()]
        outputs = resources(self.cloud)["outputs"]
        exports += [f"export {env_name(k)}={v}" for k, v in outputs.items()]
        self.app.ready(self.cloud, "\n".join(exports) + "\n")
        text = f"ready: AWS_ENDPOINT_URL={self.url}\n" + "\n".join(exports) + "\n"
        out = sys.__stdout__
        if out is not None:
            out.write(text)
            out.flush()
        return text

    def run_schedules(self) -> None:
        """Fire schedule rules when their time comes (checked every few seconds)."""
        started = datetime.now(UTC)
        plans: list[tuple[Any, Schedule]] = []
        for rule in self.cloud.bus.rules:
            if rule.schedule and rule.enabled:
                try:
                    plans.append((rule, Schedule(rule.schedule, started)))
                except ValueError:
                    log.warning("schedule %s (%s): only fired on demand", rule.name, rule.schedule)
        assert self.app is not None
        while not self.stopping.wait(5.0):
            now = datetime.now(UTC)
            for rule, plan in plans:
                if plan.due(now):
                    say(f"schedule {rule.name} ({rule.schedule}) fired")
                    fire(self.cloud, rule.name, self.app.fire_lock)

    def start_schedules(self) -> None:
        thread = threading.Thread(target=self.run_schedules, name="localmode-schedules", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> list[int]:
        """Stop serving, stop training jobs and endpoints, tear the emulation down; PIDs that had to be killed."""
        self.stopping.set()
        watchdog = threading.Timer(SHUTDOWN_DEADLINE_S, self._give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
            cloud = self.cloud
            if cloud is not None:
                for runner in list(getattr(cloud, "runners", [])):
                    try:
                        runner.stop()
                    except Exception:  # noqa: BLE001 - stopping goes on
                        log.exception("stopping %s", runner.name)
                endpoints = getattr(cloud, "endpoints", None)
                if endpoints is not None:
                    endpoints.stop_all(timeout=10.0)
            # What is left (an endpoint still starting, a training process past its SIGTERM) is killed, so that
            # the threads waiting on those processes end and nothing outlives up.
            killed = kill_descendants(grace_s=10.0)
            for undo in reversed(self._undo):
                undo()
            if cloud is not None and getattr(cloud, "_mock", None) is not None:
                try:
                    cloud.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping local mode")
            return killed
        finally:
            watchdog.cancel()

    @staticmethod
    def _give_up() -> None:
        say(f"error: shutdown still waiting after {SHUTDOWN_DEADLINE_S:.0f} s; killing what is left")
        kill_descendants(grace_s=2.0)
        os._exit(1)


def up(port: int, work_dir: Path, parameters: dict[str, str], data: Path | None, metadata: Path | None,
       host: str = "127.0.0.1", schedules: bool = True, template: Path | None = None) -> int:
    """``python -m localmode up``: serve until SIGINT/SIGTERM; 0 after a clean stop, 1 when it could not start."""
    from tools.cli import ToolError, fail

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = LocalServer(port, work_dir, parameters, host=host, schedules=schedules, template=template)
    t0 = time.monotonic()
    try:
        server.bind()
        say(f"deploying template.yaml into local mode (work dir {work_dir})...")
        server.deploy()
        if stop.is_set():
            return 130
        if data is not None:
            counts = server.load(data, metadata)
            say(f"manifest: {json.dumps(counts)}")
        server.announce()
        say(f"up in {time.monotonic() - t0:.1f}s; handler logs in {server.cloud.runtime.log_path}; "
            "Ctrl-C stops (and discards everything)")
        if schedules:
            server.start_schedules()
        # CloudWatch evaluates alarms every minute; a rehearsal should not wait that long to see one change.
        server.cloud.alarms.start(ALARM_EVALUATION_S)
        while not stop.wait(1.0):
            pass
        say("stopping: training jobs, endpoints, then the emulator...")
        return 0
    except ToolError as err:
        return fail(str(err))
    finally:
        killed = server.close()
        if killed:
            log.info("stopped processes %s", killed)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fire_remote(rule: str, port: int, host: str = "127.0.0.1") -> int:
    """``python -m localmode fire RULE``: ask a running ``up`` to fire a schedule rule; print its answer."""
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    from tools.cli import fail

    request = urllib.request.Request(f"http://{host}:{port}{FIRE_PREFIX}{quote(rule)}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("message", err.reason)
        except ValueError:
            message = err.reason
        return fail(f"{message}")
    except OSError as err:
        return fail(f"nothing answers on {host}:{port} ({getattr(err, 'reason', err)}): start it with "
                    f"`python -m localmode up --port {port}`")
    try:
        print(json.dumps(answer, indent=2, default=str))
    except BrokenPipeError:  # piped into head: the answer was read as far as wanted
        pass
    return 0 if answer.get("ok") else 1
