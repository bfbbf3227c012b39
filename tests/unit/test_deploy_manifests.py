"""Every file in deploy/ is parsed and held to the promises the deployment makes.

No image is built and no cluster or systemd is run here (CI has neither a Docker daemon nor a
cluster), so the promises are checked by reading the files:

* each file is classified by kind, and a file of an unknown kind fails, so a new manifest
  cannot skip its checks;
* every ``xkt-server``/``xkt-client`` command line in a Dockerfile, Compose service, Kubernetes
  container, probe or systemd unit is parsed by the real CLI (unknown or missing options fail);
* everything runs as UID 10001 (never root) with a read-only root filesystem, without
  capabilities or privilege escalation; Kubernetes pods meet Pod Security "restricted";
* probes and health checks ask the gRPC health service (``xkt-server health``) or the fleet
  proxy's ``/health``; the published, listened-on, Service, container and NetworkPolicy ports
  are exactly gRPC 8443 and Fleet 9443;
* no secret is written anywhere: no PEM blocks, no secret-looking values, no Kubernetes Secret
  objects, private keys only from mounted secrets or systemd credentials;
* versions agree with pyproject.toml (Python 3.11, torch, flwr, the image tag);
* the Makefile and both Dockerfiles install through deploy/install.sh, whose dry run installs
  the pinned torch before anything else.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import typer
import yaml  # type: ignore[import-untyped, unused-ignore]  # PyYAML (through flwr); no stubs in the dev deps

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRPC_PORT, FLEET_PORT = 8443, 9443
PORTS = {GRPC_PORT, FLEET_PORT}
UID = 10001
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
COPY_SOURCES = {  # what an image build may take from the repository: the source tree and the install script
    "pyproject.toml",
    "README.md",
    "deploy/install.sh",
    *("shared", "server", "client", "protos", "benchmarks"),
}
SECRETISH = re.compile(r"passw(or)?d|passphrase|token|secret|api[_-]?key|private[_-]?key|credential", re.I)
SECRET_REFERENCE_KEYS = {"secretName", "secrets"}  # a name that points at a secret, never its value
PRIVATE_FILES = {  # per command, the parameters that name a private key (or token) file
    "serve": ("tls_key",),
    "federate": ("tls_key",),
    "health": ("client_key",),
    "join": ("key",),
    "adapt": ("site_key", "client_key", "token_file"),
}


# ---------------------------------------------------------------- what pyproject.toml pins


@functools.cache
def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def pinned(name: str) -> str:
    """pyproject.toml's requirement of ``name`` without spaces, e.g. ``torch==2.13.0``."""
    found = [d.replace(" ", "") for d in project()["project"]["dependencies"] if re.match(rf"{name}\b", d)]
    assert len(found) == 1, f"pyproject.toml lists {name} {len(found)} times"
    return str(found[0].split(";")[0])


def python_minor() -> str:
    return str(project()["tool"]["mypy"]["python_version"])  # "3.11", the version everything is checked for


def image_tag() -> str:
    return str(project()["project"]["version"])


# ---------------------------------------------------------------- classification


KINDS: dict[str, Callable[[PurePosixPath], bool]] = {
    "readme": lambda p: str(p) == "README.md",
    "install-script": lambda p: str(p) == "install.sh",
    "dockerfile": lambda p: p.parent.name == "docker" and p.suffix == ".Dockerfile",
    "dockerignore": lambda p: p.parent.name == "docker" and p.name.endswith(".Dockerfile.dockerignore"),
    "compose": lambda p: str(p) == "compose.yaml",
    "kustomization": lambda p: str(p) == "k8s/kustomization.yaml",
    "k8s": lambda p: p.parent.name == "k8s" and p.suffix == ".yaml" and p.name != "kustomization.yaml",
    "systemd-service": lambda p: p.parent.name == "systemd" and p.suffix == ".service",
    "systemd-timer": lambda p: p.parent.name == "systemd" and p.suffix == ".timer",
    "env-file": lambda p: p.parent.name == "systemd" and p.suffix == ".env",
    "sysusers": lambda p: p.parent.name == "systemd" and p.name.endswith(".sysusers.conf"),
}


class UnknownKind(AssertionError):
    """A file in deploy/ that no check knows: give it a kind and checks before adding it."""


def classify(relative: PurePosixPath) -> str:
    kinds = [kind for kind, matches in KINDS.items() if matches(relative)]
    if len(kinds) != 1:
        raise UnknownKind(f"deploy/{relative} is of no known kind ({kinds}); add its checks to {Path(__file__).name}")
    return kinds[0]


def files_by_kind(root: Path) -> dict[str, list[Path]]:
    """Every file under ``root`` (hidden ones too), grouped by kind; an unknown kind raises."""
    grouped: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        grouped[classify(PurePosixPath(path.relative_to(root).as_posix()))].append(path)
    return grouped


@functools.cache
def deploy_files() -> dict[str, list[Path]]:
    return files_by_kind(DEPLOY)


def test_every_file_in_deploy_is_of_a_checked_kind() -> None:
    grouped = deploy_files()
    for kind in ("readme", "install-script", "dockerfile", "compose", "k8s", "kustomization", "systemd-service"):
        assert grouped[kind], f"deploy/ has no {kind}"


def test_a_file_of_unknown_kind_fails(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    files_by_kind(tmp_path / "deploy")  # the real tree passes ...
    for stray in ("helm/values.yaml", "notes.txt", "docker/Dockerfile", "k8s/secret.json", "systemd/xkt.socket"):
        extra = tmp_path / "deploy" / stray
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_text("x\n")
        with pytest.raises(UnknownKind, match=re.escape(stray)):  # ... and any unknown file fails it
            files_by_kind(tmp_path / "deploy")
        extra.unlink()


def test_the_readme_names_every_file() -> None:
    text = (DEPLOY / "README.md").read_text()
    for files in deploy_files().values():
        for path in files:
            name = path.relative_to(DEPLOY).as_posix()
            if name != "README.md" and name not in text and not name.endswith(".dockerignore"):
                pytest.fail(f"deploy/README.md does not say what {name} is")
    assert "docker/*.Dockerfile.dockerignore" in text


# ---------------------------------------------------------------- the real command line


@functools.cache
def cli(program: str) -> click.Group:
    if program == "xkt-server":
        from xkt.server.cli import app
    elif program == "xkt-client":
        from xkt.client.cli import app
    else:
        raise AssertionError(f"{program} is not an xkt command")
    command = typer.main.get_command(app)
    assert isinstance(command, click.Group)
    return command


def parse_command_line(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv`` with the real CLI (no command runs); its option values by parameter name."""
    program = PurePosixPath(argv[0]).name
    command: click.Command = cli(program)
    args, path = list(argv[1:]), [program]
    while isinstance(command, click.Group):
        assert args, f"`{' '.join(path)}` needs a command"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"`{' '.join(path)}` has no command {args[0]!r}"
        path.append(args.pop(0))
        command = sub
    try:
        with command.make_context(" ".join(path), args) as context:
            return dict(context.params)
    except click.ClickException as error:
        raise AssertionError(f"`{' '.join(argv)}` does not parse: {error.format_message()}") from None


def private_files(argv: Sequence[str]) -> list[str]:
    """The private key and token paths ``argv`` passes, plus ``KIT/site.key`` for a ``--kit``."""
    params = parse_command_line(argv)
    found = [str(params[name]) for name in PRIVATE_FILES.get(argv[1], ()) if params.get(name) is not None]
    return found + ([f"{params['kit']}/site.key"] if params.get("kit") is not None else [])


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


PROBE = ["python", "-m", "xkt.server.commands.health"]
"""How probes run ``xkt-server health``: the same command without importing torch (a tenth of the cost)."""


def probe_as_cli(argv: Sequence[str]) -> list[str]:
    """A probe's command line as the ``xkt-server health`` it is."""
    assert list(argv[:3]) == PROBE, f"a probe must run `{' '.join(PROBE)}` (xkt-server health), not {argv}"
    return ["xkt-server", "health", *argv[3:]]


def check_health_probe(argv: Sequence[str], port: int) -> None:
    """``xkt-server health`` asking the right port: gRPC health for 8443, the proxy's /health for 9443."""
    params = parse_command_line(probe_as_cli(argv))
    assert port_of(params["address"]) == port, f"{argv} probes another port than {port}"
    assert params["fleet"] == (port == FLEET_PORT), f"{argv}: --fleet is for the fleet proxy (9443) only"
    assert not params["insecure"], f"{argv} probes without TLS"


def test_the_command_line_check_refuses_unknown_and_missing_options() -> None:
    parse_command_line(["xkt-client", "join-key", "--out", "x"])
    with pytest.raises(AssertionError, match="No such option"):
        parse_command_line(["xkt-client", "join-key", "--out", "x", "--no-such-option"])
    with pytest.raises(AssertionError, match="Missing option"):
        parse_command_line(["xkt-server", "serve", "--listen", "0.0.0.0:8443"])
    with pytest.raises(AssertionError, match="no command"):
        parse_command_line(["xkt-server", "keys", "rotate"])


# ---------------------------------------------------------------- no secrets anywhere


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every mapping entry in a parsed YAML document."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield path, str(key), value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from walk(item, f"{path}[{index}]")


def test_no_file_holds_a_secret() -> None:
    for files in deploy_files().values():
        for path in files:
            text = path.read_text()
            assert "-----BEGIN" not in text and "PRIVATE KEY" not in text, f"{path} holds a PEM block"
    for path, document in yaml_documents():
        for where, key, value in walk(document):
            holds_value = isinstance(value, str | int) and not isinstance(value, bool)
            if SECRETISH.search(key) and key not in SECRET_REFERENCE_KEYS and holds_value:
                pytest.fail(f"{path}: {where}.{key} holds a value; reference a secret instead")
            if key == "env" and isinstance(value, list):
                for entry in value:
                    assert not (SECRETISH.search(entry["name"]) and "value" in entry), f"{path}: {entry['name']}"
    for path in deploy_files()["env-file"]:
        for name in env_file(path):
            assert not SECRETISH.search(name), f"{path} sets {name}: secrets go through LoadCredential="
    for dockerfile in dockerfiles():
        for instruction in dockerfile.instructions:
            if instruction.name in ("ENV", "ARG"):
                assert not SECRETISH.search(instruction.value), f"{dockerfile.path}: {instruction.value}"


def yaml_documents() -> Iterator[tuple[Path, Any]]:
    for kind in ("compose", "k8s", "kustomization"):
        for path in deploy_files()[kind]:
            for document in yaml.safe_load_all(path.read_text()):
                yield path, document


# ---------------------------------------------------------------- pinned versions


def test_every_pin_in_deploy_agrees_with_pyproject() -> None:
    torch, flwr = pinned("torch"), pinned("flwr")
    for files in deploy_files().values():
        for path in files:
            text = path.read_text()
            for found in re.findall(r"\btorch==\d[\w.*+]*", text):
                assert found == torch, f"{path} pins {found}, pyproject.toml {torch}"
            for found in re.findall(r"\bflwr(?:\[[\w,]+\])?==[\w.*]+", text):
                assert found.split("==")[1] == flwr.split("==")[1], f"{path} pins {found}, pyproject.toml {flwr}"
            for found in re.findall(r"python:(\d+\.\d+)", text):
                assert found == python_minor(), f"{path} uses Python {found}, pyproject.toml checks {python_minor()}"
    assert project()["tool"]["ruff"]["target-version"] == "py" + python_minor().replace(".", "")


# ---------------------------------------------------------------- the install script and the Makefile


def dry_run(*args: str, **env: str) -> list[list[str]]:
    """The commands ``install.sh ARGS`` would run, each as argv (it reads the pin with $PYTHON, 3.11+)."""
    done = subprocess.run(
        [str(DEPLOY / "install.sh"), *args, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable, **env},
        check=True,
    )
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def test_the_install_script_puts_the_pinned_cpu_torch_first(tmp_path: Path) -> None:
    script = DEPLOY / "install.sh"
    assert script.read_text().startswith("#!/bin/sh\n") and "\nset -eu\n" in script.read_text()
    assert os.access(script, os.X_OK), "deploy/install.sh must be executable (the Makefile runs it directly)"
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    steps = dry_run("python", "--venv", str(tmp_path / "venv"), "--extras", "dev", "--editable")
    assert steps[0] == [sys.executable, "-m", "venv", str(tmp_path / "venv")]
    installs = [step for step in steps if step[1:4] == ["-m", "pip", "install"]]
    assert installs[0][-1] == pinned("torch"), "torch must be installed first, pinned as pyproject.toml pins it"
    assert installs[1][-2:] == ["-e", f"{ROOT}[dev]"]
    assert steps[-1][1:] == ["-"], "the script must end by checking that no CUDA torch got in"
    steps = dry_run("python", "--venv", str(tmp_path / "venv"), TORCH_INDEX_URL=CPU_INDEX)
    first = [step for step in steps if "install" in step][0]
    assert first[-3:] == ["--index-url", CPU_INDEX, pinned("torch")]
    with pytest.raises(subprocess.CalledProcessError):
        dry_run("python")  # no --venv


def test_the_makefile_installs_through_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "INSTALL := ./deploy/install.sh" in makefile
    for mode in ("$(INSTALL) python --venv $(VENV) --extras dev --editable", "$(INSTALL) nginx", "$(INSTALL) real"):
        assert mode in makefile, f"the Makefile no longer runs `{mode}`"
    assert "pip install" not in makefile, "the Makefile installs around deploy/install.sh"
    assert re.search(r"^\$\(STAMP\): .*deploy/install\.sh", makefile, re.M), "a changed script must reinstall"


# ---------------------------------------------------------------- Dockerfiles


@dataclass(frozen=True)
class Instruction:
    name: str
    value: str
    stage: int  # index of the FROM it belongs to


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    args: dict[str, str] = field(default_factory=dict)  # ARGs declared before the first FROM

    def all(self, name: str, stage: int | None = None) -> list[str]:
        return [i.value for i in self.instructions if i.name == name and (stage is None or i.stage == stage)]

    @property
    def final_stage(self) -> int:
        return len(self.all("FROM")) - 1

    def exec_form(self, name: str) -> list[str]:
        values = self.all(name, self.final_stage)
        assert values, f"{self.path} has no {name}"
        parsed = json.loads(values[-1])
        assert isinstance(parsed, list), f"{self.path}: {name} must be in exec form"
        return [str(v) for v in parsed]

    @property
    def image(self) -> str:
        return "xkt-" + self.path.name.removesuffix(".Dockerfile")


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped (as Docker reads them)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path} ends inside a continuation"
    instructions, args, stage = [], {}, -1
    for text in logical:
        name, _, value = text.strip().partition(" ")
        name = name.upper()
        if name == "FROM":
            stage += 1
        elif name == "ARG" and stage < 0:
            key, _, default = value.partition("=")
            args[key] = default
        instructions.append(Instruction(name, value.strip(), stage))
    return Dockerfile(path, instructions, args)


@functools.cache
def dockerfiles() -> list[Dockerfile]:
    return [parse_dockerfile(path) for path in deploy_files()["dockerfile"]]


@functools.cache
def entrypoint_of(image: str) -> list[str]:
    """The ENTRYPOINT of ``xkt-owner:TAG`` or ``xkt-site:TAG``, the image tag checked against pyproject."""
    name, _, tag = image.partition(":")
    assert tag == image_tag(), f"image {image}: tag must be the project version {image_tag()}"
    found = [d for d in dockerfiles() if d.image == name]
    assert found, f"no deploy/docker/ Dockerfile builds {name}"
    return found[0].exec_form("ENTRYPOINT")


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("docker/*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    base = dockerfile.args.get("PYTHON_IMAGE", "")
    assert re.fullmatch(rf"python:{re.escape(python_minor())}\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{{64}})?", base), base
    if "@sha256:" not in base:
        assert "digest" in path.read_text(), f"{path}: say why the base image has no digest"
    for value in dockerfile.all("FROM"):
        assert value.split()[0] == "${PYTHON_IMAGE}", f"{path}: every stage starts from the one pinned base"
    _check_install_steps(dockerfile)
    _check_runtime_user_and_paths(dockerfile)
    for value in dockerfile.all("COPY"):
        sources = [s for s in value.split()[:-1] if not s.startswith("--")]
        if "--from=build" not in value:
            assert set(sources) <= COPY_SOURCES, f"{path}: COPY {sources} brings more than the source tree"
    assert not dockerfile.all("ADD"), f"{path}: ADD fetches and unpacks; use COPY"
    argv = dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")
    if argv[1:] != ["--help"]:
        parse_command_line(argv)
    _check_healthcheck(dockerfile)


def _check_install_steps(dockerfile: Dockerfile) -> None:
    path, runs = dockerfile.path, dockerfile.all("RUN")
    assert not any(re.search(r"\bpip3? install\b", run) for run in runs), f"{path}: install through install.sh"
    assert "./deploy/install.sh python --venv /opt/xkt" in dockerfile.all("RUN", 0), f"{path}: builds no venv"
    assert f"TORCH_INDEX_URL={CPU_INDEX}" in dockerfile.all("ARG", 0), f"{path}: torch must come from the CPU index"
    if dockerfile.image == "xkt-owner":
        assert any("install.sh nginx --required" in run for run in dockerfile.all("RUN", dockerfile.final_stage))


def _check_runtime_user_and_paths(dockerfile: Dockerfile) -> None:
    path, final = dockerfile.path, dockerfile.final_stage
    users = dockerfile.all("USER", final)
    assert users and users[-1] == f"{UID}:{UID}", f"{path}: the image must run as {UID}:{UID}"
    volumes = json.loads(dockerfile.all("VOLUME", final)[-1])
    env = dict(
        item.split("=", 1)
        for value in dockerfile.all("ENV", final)
        for item in shlex.split(value.replace("\\", ""))
        if "=" in item
    )
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", f"{path}: Python must not write next to its code"
    for name in ("HOME", "XDG_CACHE_HOME", "FLWR_HOME", "MPLCONFIGDIR"):
        value = env.get(name, "")
        assert value.startswith("/tmp") or any(value.startswith(v) for v in volumes), f"{path}: {name}={value!r}"
    exposed = {int(p) for value in dockerfile.all("EXPOSE", final) for p in value.split()}
    assert exposed == (PORTS if dockerfile.image == "xkt-owner" else set()), f"{path} exposes {exposed}"


def _check_healthcheck(dockerfile: Dockerfile) -> None:
    checks = dockerfile.all("HEALTHCHECK", dockerfile.final_stage)
    assert len(checks) == 1, f"{dockerfile.path} needs one HEALTHCHECK"
    if dockerfile.image == "xkt-site":
        assert checks[0] == "NONE"  # nothing listens on a site: compose's join services probe the owner
        return
    options, _, command = checks[0].partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    check_health_probe(json.loads(command), GRPC_PORT)


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("docker/*.dockerignore")), ids=lambda p: p.name)
def test_dockerignore_lets_only_the_source_tree_in(path: Path) -> None:
    dockerfile = parse_dockerfile(path.with_name(path.name.removesuffix(".dockerignore")))
    rules = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", f"{path} must start by excluding everything"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {s for v in dockerfile.all("COPY") if "--from" not in v for s in v.split()[:-1]}
    assert allowed == copied, f"{path} lets in {sorted(allowed)}, the Dockerfile copies {sorted(copied)}"
    for pattern in ("**/*.key", "**/*.pem", "**/*.crt"):
        assert pattern in rules, f"{path} must keep {pattern} out of the build context"


# ---------------------------------------------------------------- Compose


@functools.cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def compose_services() -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose()["services"].items()


def test_compose_services_are_hardened() -> None:
    for name, service in compose_services():
        assert service["user"] == f"{UID}:{UID}", name
        assert service["read_only"] is True, f"{name}: the root filesystem must be read-only"
        assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"]), f"{name}: /tmp must be a tmpfs"
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert not service.get("privileged"), name
        image = service["image"]
        assert service["build"]["dockerfile"] == f"deploy/docker/{image.split(':')[0].removeprefix('xkt-')}.Dockerfile"
        parse_command_line(entrypoint_of(image) + service["command"])


def test_compose_health_checks_ports_and_listen_addresses_agree() -> None:
    published: set[int] = set()
    for name, service in compose_services():
        params = parse_command_line(entrypoint_of(service["image"]) + service["command"])
        ports = {int(p.split(":")[-1]) for p in service.get("ports", [])}
        published |= ports
        if "listen" in params:
            assert ports == {port_of(params["listen"])}, f"{name} listens on {params['listen']}, publishes {ports}"
        if service["restart"] != "no" or "listen" in params:  # long-running: docker must know its health
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD", f"{name}: exec-form health check"
            port = port_of(params["listen"]) if "listen" in params else FLEET_PORT
            check_health_probe(test[1:], port)
    assert published == PORTS


def test_compose_mounts_secrets_read_only_and_writes_only_to_volumes() -> None:
    declared_secrets, declared_volumes = compose()["secrets"], compose()["volumes"]
    for secret in declared_secrets.values():
        assert set(secret) == {"file"}, "a Compose secret is a file on the host, never inline content"
    for name, service in compose_services():
        mounted = {s["target"]: s["source"] for s in service.get("secrets", [])}
        assert set(mounted.values()) <= set(declared_secrets), name
        for volume in service["volumes"]:
            if volume["type"] == "bind":
                assert volume["read_only"] is True, f"{name}: bind {volume['target']} must be read-only"
                assert volume["bind"]["create_host_path"] is False, f"{name}: a missing file must fail, not appear"
                assert not volume["target"].endswith(".key"), f"{name}: private keys come as secrets"
            else:
                assert volume["type"] == "volume" and volume["source"] in declared_volumes, name
        command_lines = [entrypoint_of(service["image"]) + service["command"]]
        if "healthcheck" in service:
            command_lines.append(probe_as_cli(service["healthcheck"]["test"][1:]))
        for argv in command_lines:
            for private in private_files(argv):
                assert private in mounted, f"{name}: {private} must be mounted from a Compose secret"


# ---------------------------------------------------------------- Kubernetes


@functools.cache
def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in deploy_files()["k8s"]:
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path}: every document is one object"
            found.append((path, document))
    return found


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [obj for _, obj in k8s_objects() if obj["kind"] in kinds]


def containers(pod: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def test_k8s_objects_are_of_known_kinds_in_the_restricted_namespace() -> None:
    kinds = {obj["kind"] for _, obj in k8s_objects()}
    assert "Secret" not in kinds, "Secret objects are created from the provisioned files, never stored here"
    assert kinds <= {"Namespace", "PersistentVolumeClaim", "Deployment", "Job", "Service", "NetworkPolicy"}, kinds
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for _, obj in k8s_objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["metadata"]["name"]


def test_kustomization_applies_every_standing_object() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    jobs = {path.name for path, obj in k8s_objects() if obj["kind"] == "Job"}
    files = {path.name for path in deploy_files()["k8s"]}
    assert set(kustomization["resources"]) == files - jobs, "kustomization.yaml must list every file but the Jobs'"
    assert kustomization["images"] == [{"name": "xkt-owner", "newTag": image_tag()}]


def test_k8s_pods_meet_pod_security_restricted() -> None:
    for workload in of_kind("Deployment", "Job"):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == UID, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, f"{name} needs no API token"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod["volumes"]:
            assert set(volume) & {"secret", "configMap", "emptyDir", "persistentVolumeClaim"}, f"{name}: {volume}"
        for container in containers(pod):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, where
            assert context["runAsNonRoot"] is True and context.get("runAsUser", UID) == UID, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"
            assert container["image"].split(":")[0] == "xkt-owner", where
            entrypoint_of(container["image"])  # the tag is the project version


def test_k8s_containers_run_real_commands_and_probe_health() -> None:
    for workload in of_kind("Deployment", "Job"):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        for init in pod.get("initContainers", []):
            assert init["command"][:2] == ["/bin/sh", "-ec"], f"{name}: init containers only copy keys"
            assert "xkt-" not in " ".join(init["args"]), f"{name}: init containers run no xkt command"
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            params = parse_command_line(entrypoint_of(container["image"]) + container["args"])
            (port,) = [p["containerPort"] for p in container["ports"]]
            assert port_of(params["listen"]) == port, f"{where} listens on {params['listen']}, declares {port}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert probe in container or probe == "startupProbe", f"{where} has no {probe}"
                if probe in container:
                    _check_k8s_probe(container[probe], container, where)


def _check_k8s_probe(probe: Mapping[str, Any], container: Mapping[str, Any], where: str) -> None:
    (port,) = [p["containerPort"] for p in container["ports"]]
    if "exec" in probe:
        check_health_probe(probe["exec"]["command"], port)
        assert probe["timeoutSeconds"] >= 10, f"{where}: the probe starts a Python process"
        return
    assert port == FLEET_PORT, f"{where}: the gRPC service is probed with `xkt-server health`"
    get = probe["httpGet"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert get["path"] == "/health" and get["scheme"] == "HTTPS" and named.get(get["port"], get["port"]) == port


def test_k8s_private_keys_come_from_secrets_copied_private() -> None:
    for workload in of_kind("Deployment", "Job"):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert {s["secretName"] for s in secrets.values()} <= {"xkt-owner-tls", "xkt-owner-probe"}, name
        for container in containers(pod):
            for variable in container.get("env", []):
                assert "value" not in variable or not SECRETISH.search(variable["name"]), name
        (init,) = pod["initContainers"]
        script = init["args"][0]
        assert script.lstrip().startswith("umask 077"), f"{name}: the copies must be private (xkt refuses 0440 keys)"
        mounted = {m["name"] for m in init["volumeMounts"]}
        assert set(secrets) <= mounted, f"{name}: every secret goes through the init container"
        for container in pod["containers"]:
            assert not {m["name"] for m in container["volumeMounts"]} & set(secrets), f"{name}: raw secret mounted"


def named_ports(workload: Mapping[str, Any]) -> dict[str, int]:
    """Port name → containerPort over a workload's main containers."""
    pod = workload["spec"]["template"]["spec"]
    return {port["name"]: port["containerPort"] for container in pod["containers"] for port in container["ports"]}


def test_k8s_ports_match_across_services_containers_and_network_policy() -> None:
    workloads = of_kind("Deployment", "Job")
    assert {port for w in workloads for port in named_ports(w).values()} == PORTS
    service_ports = set()
    for service in of_kind("Service"):
        name, selector = service["metadata"]["name"], service["spec"]["selector"].items()
        selected = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        for port in service["spec"]["ports"]:
            target = named_ports(selected[0]).get(port["targetPort"], port["targetPort"])
            assert port["port"] == target, f"Service {name}: {port}"
            service_ports.add(target)
    assert service_ports == PORTS
    (policy,) = of_kind("NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == PORTS, f"the NetworkPolicy lets in {allowed}"
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), workload["metadata"]["name"]


def test_k8s_claims_exist_and_models_are_mounted_read_only() -> None:
    claims = {c["metadata"]["name"] for c in of_kind("PersistentVolumeClaim")}
    for workload in of_kind("Deployment", "Job"):
        for volume in workload["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                assert claim["claimName"] in claims, claim
                if claim["claimName"] == "xkt-models":
                    assert claim["readOnly"] is True, "a server never writes the signed models"
    (serve,) = [w for w in of_kind("Deployment") if w["metadata"]["name"] == "xkt-serve"]
    assert serve["spec"]["replicas"] == 1 and serve["spec"]["strategy"]["type"] == "Recreate", "one audit writer"


# ---------------------------------------------------------------- systemd


@dataclass(frozen=True)
class Unit:
    path: Path
    entries: list[tuple[str, str, str]]  # (section, key, value), repeated keys kept in order

    def values(self, key: str, section: str | None = None) -> list[str]:
        return [v for s, k, v in self.entries if k == key and (section is None or s == section)]

    def one(self, key: str) -> str:
        found = self.values(key)
        assert len(found) == 1, f"{self.path.name}: {key}= appears {len(found)} times"
        return found[0]


def parse_unit(path: Path) -> Unit:
    """A systemd unit: sections, ``Key=value`` lines (backslash continuations joined), comments dropped."""
    entries, section, pending = [], "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not Key=value"
        entries.append((section, key.strip(), value.strip()))
    return Unit(path, entries)


def env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs), f"{path}: NAME=value lines only"
    return dict((name, value) for name, value in pairs)


def exec_start(unit: Unit) -> list[str]:
    """ExecStart= as argv, with ${VAR} from its EnvironmentFile and %d the credentials directory."""
    (environment_file,) = unit.values("EnvironmentFile")
    installed = PurePosixPath(environment_file)
    assert installed.parent == PurePosixPath("/etc/xkt"), f"{unit.path.name}: settings live in /etc/xkt"
    settings = env_file(DEPLOY / "systemd" / installed.name)
    line = unit.one("ExecStart").lstrip("-@+!:")
    for name in re.findall(r"\$\{(\w+)\}", line):
        assert name in settings, f"{unit.path.name} uses ${{{name}}}, which {installed.name} does not set"
        line = line.replace(f"${{{name}}}", settings[name])
    return shlex.split(line.replace("%d", f"/run/credentials/{unit.path.name}"))


SITE_WRITABLE = {"/var/lib/xkt/out", "/var/lib/xkt/cache"}
OWNER_WRITABLE = {"/srv/xkt/audit", "/var/cache/xkt"}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("systemd/*.service")), ids=lambda p: p.name)
def test_systemd_service(path: Path) -> None:
    unit = parse_unit(path)
    for key, value in HARDENING.items():
        assert unit.values(key, "Service") == [value], f"{path.name}: {key}={value} is missing"
    assert "@system-service" in unit.values("SystemCallFilter"), f"{path.name}: SystemCallFilter=@system-service"
    (user,) = unit.values("User")
    assert user == sysusers_user() and user != "root", f"{path.name} must run as the sysusers.d user"
    writable = {p for v in unit.values("ReadWritePaths") for p in v.split()}
    writable |= {f"/var/lib/{p}" for v in unit.values("StateDirectory") for p in v.split()}
    writable |= {f"/var/cache/{p}" for v in unit.values("CacheDirectory") for p in v.split()}
    argv = exec_start(unit)
    owner = PurePosixPath(argv[0]).name == "xkt-server"
    assert writable <= (OWNER_WRITABLE if owner else SITE_WRITABLE), f"{path.name} may write {writable}"
    assert argv[0].startswith("/opt/xkt/bin/"), f"{path.name}: run the venv install.sh made"
    params = parse_command_line(argv)
    credentials = {v.split(":", 1)[0] for v in unit.values("LoadCredential")}
    for value in unit.values("LoadCredential"):
        assert PurePosixPath(value.split(":", 1)[1]).is_absolute(), f"{path.name}: {value}"
    for arg in argv:
        if arg.startswith("/run/credentials/"):
            name = PurePosixPath(arg).name
            assert name == path.name or name in credentials, f"{path.name}: %d/{name} is not loaded"
    for private in private_files(argv):
        assert private.startswith("/run/credentials/"), f"{path.name}: {private} must come via LoadCredential="
    if params.get("kit") is not None:
        assert {"ca.crt", "site.crt", "site.key"} <= credentials, f"{path.name}: the kit needs all three files"


def test_systemd_site_units_join_long_running_and_adapt_on_a_timer() -> None:
    join, adapt = parse_unit(DEPLOY / "systemd/xkt-join.service"), parse_unit(DEPLOY / "systemd/xkt-adapt.service")
    assert exec_start(join)[1] == "join" and join.one("Restart") == "on-failure"
    assert "--until-finished" not in exec_start(join), "a service keeps taking rounds"
    assert exec_start(adapt)[1] == "adapt" and adapt.one("Type") == "oneshot"
    timers = [parse_unit(path).one("Unit") for path in deploy_files()["systemd-timer"]]
    assert "xkt-adapt.service" in timers


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("systemd/*.timer")), ids=lambda p: p.name)
def test_systemd_timer_starts_a_oneshot_unit_of_ours(path: Path) -> None:
    timer = parse_unit(path)
    service = parse_unit(DEPLOY / "systemd" / timer.one("Unit"))  # a unit this folder ships (and checks)
    assert service.one("Type") == "oneshot", f"{path.name} starts a service that would never finish"
    assert timer.one("OnCalendar") and timer.one("Persistent") == "yes", f"{path.name}: missed runs must catch up"
    assert timer.values("WantedBy", "Install") == ["timers.target"]


def test_every_env_file_is_some_unit_settings() -> None:
    used = {
        PurePosixPath(v).name
        for p in deploy_files()["systemd-service"]
        for v in parse_unit(p).values("EnvironmentFile")
    }
    assert {path.name for path in deploy_files()["env-file"]} == used


def sysusers_user() -> str:
    (path,) = deploy_files()["sysusers"]
    lines = [line.split() for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1 and lines[0][0] == "u", f"{path}: one system user"
    return lines[0][1]
