"""Deployment files checked without a Docker engine.

docker-compose.yml, docker/compose.cpu.yml, docker/Dockerfile, .dockerignore and .env.example are
parsed and checked against each other and against the package: services, healthchecks, volumes,
GPU reservations, that every file the Dockerfile copies exists in the build context, and that the
image's commands exist in ``hashaudit``. Where a Docker Compose client is installed,
``docker compose config`` (or ``docker-compose config``) must accept the files too.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker" / "compose.cpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

IMAGE_SERVICES = ("api", "worker", "train")  # services that run the HashAudit image
GPU_SERVICES = ("api", "worker", "train")


# ----------------------------------------------------------------------------- helpers


class _Reset:
    """What a ``!reset`` tag (Compose 2.24+) loads as."""

    def __repr__(self) -> str:
        return "RESET"


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML loader that also knows Compose's ``!reset`` tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)


def env_example() -> tuple[dict[str, str], set[str]]:
    """(active KEY=VALUE lines, every documented key incl. commented ``# KEY=...`` lines)."""
    active, documented = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            documented.add(m.group(2))
            if not m.group(1):
                active[m.group(2)] = m.group(3).strip()
    return active, documented


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


def referenced_variables(text: str) -> set[str]:
    return {m.group(2) or m.group(5) for m in _VAR.finditer(text) if not m.group(1)}


def interpolate(value, env: dict[str, str]):
    """Resolve ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` as Compose does,
    except that a variable with neither a value nor a default is an error here."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if val is None:
            raise AssertionError(f"${{{name}}} has no value in .env.example and no default")
        return val

    return _VAR.sub(sub, value)


def compose(path: Path = COMPOSE_FILE) -> dict:
    active, _ = env_example()
    return interpolate(load_yaml(path), active)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: unterminated continuation line"
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerfile_args() -> dict[str, str | None]:
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            name, eq, default = rest.partition("=")
            out[name] = default if eq else None
    return out


def dockerfile_env() -> dict[str, str]:
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, val = item.partition("=")
                out[key] = val
    return out


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        parts = []
        for seg in pat.strip("/").split("/"):
            if seg == "**":
                parts.append(".*")
            else:
                parts.append(re.escape(seg).replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        rules.append((negate, re.compile("^" + "/".join(parts).replace(".*/", "(.*/)?") + "$")))
    return rules


def dockerignored(rel: str) -> bool:
    """Whether ``rel`` (or a folder above it) is excluded from the build context."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    rules = dockerignore_patterns()
    for cand in candidates:
        excluded = False
        for negate, rx in rules:  # the last matching rule wins
            if rx.match(cand):
                excluded = not negate
        if excluded:
            return True
    return False


def service_command(svc: dict) -> list[str]:
    cmd = svc["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def volume_mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    out = []
    for v in svc.get("volumes", []):
        assert isinstance(v, str), f"use the short volume syntax: {v!r}"
        parts = v.split(":")
        assert len(parts) in (2, 3), f"volume {v!r}"
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def cli_help(argv: list[str]) -> str:
    """Help text of ``hashaudit <argv> --help`` from the package's own command table."""
    from service.cli import COMMANDS

    assert argv[0] in COMMANDS, f"`hashaudit {argv[0]}` does not exist ({sorted(COMMANDS)})"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            COMMANDS[argv[0]]([*argv[1:], "--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), f"hashaudit {' '.join(argv)} --help exited {exc.code}"
    return buf.getvalue()


# ----------------------------------------------------------------------------- compose


def test_compose_services_and_profiles():
    services = compose()["services"]
    assert {"redis", "api", "worker", "train"} <= set(services)
    assert services["train"].get("profiles") == ["train"], "train must be opt-in (profile)"
    for name in ("redis", "api", "worker"):
        assert not services[name].get("profiles"), f"{name} must start with a plain `up`"


def test_redis_persists_to_a_named_volume_and_has_a_healthcheck():
    doc = compose()
    redis = doc["services"]["redis"]
    image = redis["image"]
    assert image.startswith("redis:") and "/" not in image, f"official redis image, not {image}"
    cmd = service_command(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes", "AOF persistence must be on"
    mounts = volume_mounts(redis)
    data = [src for src, dst, _ in mounts if dst == "/data"]
    assert data, "redis needs a volume on /data"
    assert data[0] in (doc.get("volumes") or {}), f"{data[0]} must be a declared named volume"
    test = redis["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in text and "ping" in text
    assert redis.get("restart") == "unless-stopped"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_a_healthy_redis(name):
    svc = compose()["services"][name]
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["environment"]["HASHAUDIT_REDIS_URL"].startswith("redis://redis:")


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_reservation(name):
    deploy = compose()["services"][name].get("deploy") or {}
    devices = deploy.get("resources", {}).get("reservations", {}).get("devices") or []
    nvidia = [d for d in devices
              if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert nvidia, f"{name}: no nvidia GPU reservation in deploy.resources.reservations.devices"
    d = nvidia[0]
    assert d.get("count") == "all" or (isinstance(d.get("count"), int) and d["count"] >= 1) \
        or d.get("device_ids"), f"{name}: GPU reservation names no count or device_ids"


def test_worker_scales_and_restarts():
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker, "container_name breaks `--scale worker=N`"
    assert not worker.get("ports"), "a fixed host port breaks `--scale worker=N`"
    assert worker.get("restart") == "unless-stopped"
    assert service_command(worker)[0] == "worker"


def _seconds(duration: str) -> float:
    """A compose duration ("10s", "2m", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def test_api_drain_fits_in_the_stop_grace_period():
    """The API's shutdown drain (plus a second to exit) ends before Docker's SIGKILL."""
    from service.config import Settings

    api = compose()["services"]["api"]
    drain = float(api["environment"].get("HASHAUDIT_SHUTDOWN_DRAIN_S",
                                         Settings.model_fields["shutdown_drain_s"].default))
    assert drain <= 10
    assert drain + 1 < _seconds(api["stop_grace_period"])


@pytest.mark.parametrize("name,mode", [("api", "ro"), ("worker", "ro"), ("train", "rw")])
def test_model_store_mount(name, mode):
    svc = compose()["services"][name]
    store = svc["environment"]["HASHAUDIT_MODEL_STORE"]
    assert store == dockerfile_env()["HASHAUDIT_MODEL_STORE"], "compose and image disagree"
    mounts = [(src, m) for src, dst, m in volume_mounts(svc) if dst == store]
    assert mounts, f"{name}: nothing mounted on the model store {store}"
    assert mounts[0][1] == mode, f"{name}: model store mounted {mounts[0][1]}, want {mode}"


def test_api_port_matches_image_and_healthcheck():
    api = compose()["services"]["api"]
    cmd = service_command(api)
    assert cmd[0] == "serve"
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "serve must listen beyond the container"
    published = [p.rsplit(":", 1)[-1] for p in api["ports"]]
    assert port in published, f"api listens on {port}, compose publishes {published}"
    assert not (api.get("healthcheck") or {}).get("disable"), "api must keep its healthcheck"
    url = dockerfile_env()["HEALTHCHECK_URL"]
    assert re.fullmatch(rf"http://(127\.0\.0\.1|localhost):{port}/health/ready", url), url
    exposed = [rest for word, rest in dockerfile_instructions() if word == "EXPOSE"]
    assert port in " ".join(exposed).split()


def test_image_services_share_one_image_and_build():
    services = compose()["services"]
    images = {services[n]["image"] for n in IMAGE_SERVICES}
    assert len(images) == 1, f"api, worker and train should run one image, got {images}"
    declared = dockerfile_args()
    for name in IMAGE_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build.get("context", ".")).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        unknown = set(build.get("args", {})) - set(declared)
        assert not unknown, f"{name}: build args not declared in the Dockerfile: {unknown}"
        assert build["args"]["BASE_IMAGE"] == declared["BASE_IMAGE"], "default bases differ"


def test_every_compose_variable_is_documented_in_env_example():
    _, documented = env_example()
    for path in (COMPOSE_FILE, CPU_OVERRIDE):
        missing = referenced_variables(path.read_text()) - documented
        assert not missing, f"{path.name}: variables missing from .env.example: {sorted(missing)}"
    for name in IMAGE_SERVICES:
        assert compose()["services"][name].get("env_file") == ".env"


def test_hashaudit_variables_are_real_settings():
    from service.config import Settings

    _, documented = env_example()
    names = {k for k in documented if k.startswith("HASHAUDIT_")}
    for name in IMAGE_SERVICES:
        env = compose()["services"][name]["environment"]
        names |= {k for k in env if k.startswith("HASHAUDIT_")}
    assert names
    fields = set(Settings.model_fields)
    unknown = {n for n in names if n.removeprefix("HASHAUDIT_").lower() not in fields}
    assert not unknown, f"not fields of service.config.Settings (silently ignored): {unknown}"


def test_cpu_override_drops_gpu_reservations():
    doc = compose(CPU_OVERRIDE)
    py = re.fullmatch(r"python:(\d+)\.(\d+)-slim", doc["x-cpu"]["build"]["args"]["BASE_IMAGE"])
    assert py, doc["x-cpu"]["build"]["args"]["BASE_IMAGE"]
    need = re.match(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert (int(py[1]), int(py[2])) >= (int(need[1]), int(need[2]))
    for name in GPU_SERVICES:
        svc = doc["services"][name]
        assert svc["deploy"]["resources"]["reservations"]["devices"] is RESET, name
        assert svc["environment"]["HASHAUDIT_DEVICE"] == "cpu"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_copies_only_existing_unignored_files():
    copies = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        args = [a for a in exec_form(rest) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in exec_form(rest)), "single-stage image"
        *sources, _dest = args
        assert sources, rest
        for src in sources:
            assert not src.startswith(("http://", "https://")), f"remote ADD {src}"
            assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
            assert not dockerignored(src), f"COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_bundles_out():
    for path in (".env", ".venv", ".git", "model_store/fmnist-dpsh-32/manifest.json",
                 "service/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "README.md", "service/cli.py", "configs/default_bundle.toml"):
        assert not dockerignored(path), f"{path} is needed by the build"


def test_dockerfile_runs_as_non_root():
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users, "the image must switch to an unprivileged USER"
    args = dockerfile_args()
    # resolve ${ARG} with the ARG defaults, as a build without --build-arg does
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1)) or "", users[-1])
    user, _, group = resolved.partition(":")
    assert user and user not in ("root", "0"), f"final USER is {users[-1]!r} -> {resolved!r}"
    assert group not in ("root", "0"), f"final USER group is {group!r}"


def test_dockerfile_healthcheck_runs_the_shipped_script():
    checks = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert checks[0].upper() != "NONE"
    cmd = exec_form(checks[0].split(" CMD ", 1)[1])
    assert cmd[0] == "python" and cmd[1] == "/app/docker/healthcheck.py"
    workdir = [rest for word, rest in dockerfile_instructions() if word == "WORKDIR"][-1]
    copied = [exec_form(rest) for word, rest in dockerfile_instructions() if word == "COPY"]
    assert any(c[0] == "docker/healthcheck.py" and str(Path(workdir) / c[-1]) == cmd[1]
               for c in copied), "healthcheck.py is not copied where HEALTHCHECK runs it"


def test_torch_pins_and_base_image_match_pyproject():
    deps = {re.split(r"[=<>!~ ]", d, maxsplit=1)[0]: d
            for d in PYPROJECT["project"]["dependencies"]}
    torch_pin = deps["torch"].split("==")[1]
    vision_pin = deps["torchvision"].split("==")[1]
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == torch_pin
    assert args["TORCHVISION_VERSION"] == vision_pin
    base = args["BASE_IMAGE"]
    pattern = rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime"
    assert re.fullmatch(pattern, base), f"{base}: not the PyTorch runtime image of {torch_pin}"


def test_entry_commands_exist_in_the_package():
    from service.cli import COMMANDS

    assert PYPROJECT["project"]["scripts"]["hashaudit"] == "service.cli:main"
    instr = dockerfile_instructions()
    entry = [exec_form(rest) for word, rest in instr if word == "ENTRYPOINT"][-1]
    assert entry == ["hashaudit"]
    default_cmd = [exec_form(rest) for word, rest in instr if word == "CMD"][-1]
    services = compose()["services"]
    commands = [default_cmd] + [service_command(services[n]) for n in IMAGE_SERVICES]
    for cmd in commands:
        assert cmd[0] in COMMANDS, \
            f"`hashaudit {cmd[0]}` does not exist (service.cli.COMMANDS: {sorted(COMMANDS)})"


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_entry_command_options_exist(name):
    cmd = service_command(compose()["services"][name])
    path = [cmd[0]]
    for tok in cmd[1:]:  # sub-commands before the first option (`train bundle ...`)
        if tok.startswith("-"):
            break
        path.append(tok)
    text = cli_help(path)
    for opt in (t.split("=")[0] for t in cmd if t.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), \
            f"`hashaudit {' '.join(path)}` has no option {opt}"
    if name == "train":
        config = cmd[cmd.index("--config") + 1]
        assert (ROOT / config).is_file(), f"train config {config} is not in the repository"


# ----------------------------------------------------------------------------- healthcheck


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("docker_healthcheck", HEALTHCHECK_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_script_against_a_local_server():
    hc = _load_healthcheck()
    assert hc.DEFAULT_URL == dockerfile_env()["HEALTHCHECK_URL"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            code = 200 if self.path == "/health/ready" else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert hc.check(f"{base}/health/ready", timeout=5) == 0
        assert hc.check(f"{base}/not-ready", timeout=5) == 1
    finally:
        server.shutdown()
        server.server_close()
    # nothing listens there any more: connection refused -> unhealthy
    assert hc.check(f"{base}/health/ready", timeout=2) == 1


# ----------------------------------------------------------------------------- compose client


def _compose_client() -> tuple[list[str], int] | None:
    """The installed Compose client and its major version, or None."""
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "compose", "version", "--short"], capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0:
            return [docker, "compose"], int(r.stdout.strip().lstrip("v").split(".")[0])
    legacy = shutil.which("docker-compose")
    if legacy:
        r = subprocess.run([legacy, "version", "--short"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            return [legacy], int(r.stdout.strip().lstrip("v").split(".")[0])
    return None


@pytest.fixture()
def compose_project(tmp_path: Path) -> Path:
    """A copy of the deployment files with `.env` made from `.env.example` (the user's step)."""
    shutil.copy(COMPOSE_FILE, tmp_path / COMPOSE_FILE.name)
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "model_store").mkdir()
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    return tmp_path


def _run_config(client: list[str], project: Path, *files: str) -> subprocess.CompletedProcess:
    args = [*client]
    for f in files:
        args += ["-f", f]
    return subprocess.run([*args, "--profile", "train", "config", "-q"], cwd=project,
                          capture_output=True, text=True, timeout=120)


def test_docker_compose_config_accepts_the_file(compose_project):
    found = _compose_client()
    if found is None:
        pytest.skip("no Docker Compose client installed (`docker compose` / `docker-compose`)")
    client, _major = found
    r = _run_config(client, compose_project, "docker-compose.yml")
    assert r.returncode == 0, r.stderr + r.stdout


def test_docker_compose_config_accepts_the_cpu_override(compose_project):
    found = _compose_client()
    if found is None:
        pytest.skip("no Docker Compose client installed (`docker compose` / `docker-compose`)")
    client, major = found
    if major < 2:
        pytest.skip("docker/compose.cpu.yml uses `!reset` (Compose >= 2.24); only v1 is installed")
    r = _run_config(client, compose_project, "docker-compose.yml", "docker/compose.cpu.yml")
    assert r.returncode == 0, r.stderr + r.stdout
