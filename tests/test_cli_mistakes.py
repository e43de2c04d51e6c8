"""Every common mistake with the owner's tools gets one clear line on stderr, no traceback,
and a non-zero exit status (issue 12 §2).  Most tests run the real command as a process, as
a user would; the rest call ``sealedtorch.cli.main`` and read stderr with capsys."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sealedtorch.cli import main
from sealedtorch.keyserver.server import free_port


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealedtorch.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess[str] | str) -> str:
    """The only line on stderr, checked to be ours (not a traceback, not ANSI codes)."""
    err = proc if isinstance(proc, str) else proc.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b[" not in err, err
    assert lines[0].startswith("sealedtorch: "), err
    return lines[0]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save({"layer.weight": torch.randn(8, 4), "layer.bias": torch.randn(8)}, path)
    return path


def _seal_args(tmp_path: Path, src: Path, *extra: str) -> list[str]:
    return ["seal", str(src), "-o", str(tmp_path / "m.sealed"), "--model-id", "demo",
            "--key-out", str(tmp_path / "m.key"), "-q", *extra]


# --- seal ---------------------------------------------------------------------------------

def test_seal_to_a_missing_directory_names_the_directory_and_writes_no_key(tmp_path,
                                                                           weights):
    proc = run_cli("seal", str(weights), "-o", str(tmp_path / "nodir" / "m.sealed"),
                   "--model-id", "demo", "--key-out", str(tmp_path / "m.key"), "-q")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "--output" in line and f"{tmp_path / 'nodir'} does not exist" in line
    assert not (tmp_path / "m.key").exists()


def test_seal_with_an_invalid_model_id_names_the_flag(tmp_path, weights):
    proc = run_cli(*_seal_args(tmp_path, weights)[:4], "--model-id", "bad id!",
                   "--key-out", str(tmp_path / "m.key"), "-q")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "--model-id" in line and "invalid model id 'bad id!'" in line
    assert not (tmp_path / "m.key").exists() and not (tmp_path / "m.sealed").exists()


def test_seal_of_random_bytes_says_it_is_not_a_torch_save_file(tmp_path):
    src = tmp_path / "random.pt"
    src.write_bytes(b"\x00" + os.urandom(4095))  # neither a zip archive nor a pickle
    proc = run_cli(*_seal_args(tmp_path, src))
    assert proc.returncode == 2
    assert "not a torch.save file" in one_error_line(proc)
    assert not (tmp_path / "m.key").exists()


def test_seal_of_a_garbage_pickle_says_it_is_not_readable(tmp_path):
    src = tmp_path / "garbage.pt"
    src.write_bytes(b"\x80\x02" + b"g" * 64)
    proc = run_cli(*_seal_args(tmp_path, src))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "not a readable torch.save file" in line and "weights_only" not in line


def test_seal_of_a_directory_says_it_is_a_directory(tmp_path):
    (tmp_path / "weights").mkdir()
    proc = run_cli(*_seal_args(tmp_path, tmp_path / "weights"))
    assert proc.returncode == 2
    assert "is a directory" in one_error_line(proc)


def test_seal_of_a_whole_pickled_module_keeps_our_line_only(tmp_path):
    src = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), src)
    proc = run_cli(*_seal_args(tmp_path, src))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "torch.nn.modules.linear.Linear" in line and "state_dict()" in line
    assert "weights_only" not in line and "trust" not in line  # none of torch's essay


def test_seal_policy_without_register_is_an_error(tmp_path, weights, capsys):
    (tmp_path / "policy.json").write_text('{"allow": []}')
    assert main(_seal_args(tmp_path, weights, "--policy", str(tmp_path / "policy.json"))) == 2
    assert "--policy is only used with --register" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.sealed").exists() and not (tmp_path / "m.key").exists()


def test_seal_register_with_an_unreachable_keyserver_says_what_was_written(tmp_path,
                                                                           weights):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": "00" * 48}]}))
    token = tmp_path / "token"
    token.write_text("adm_x.y\n")
    token.chmod(0o600)
    url = f"https://127.0.0.1:{free_port()}"  # nobody listens there
    proc = run_cli(*_seal_args(tmp_path, weights, "--register", url, "--token-file",
                               str(token), "--policy", str(policy)))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unreachable" in line and "NOT registered" in line
    assert str(tmp_path / "m.sealed") in line and str(tmp_path / "m.key") in line
    assert f"sealedtorch keys register --keyserver {url} --model-id demo --key " in line
    assert (tmp_path / "m.sealed").is_file() and (tmp_path / "m.key").is_file()


def test_seal_register_with_an_http_url_is_refused_before_sealing(tmp_path, weights):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": "00" * 48}]}))
    proc = run_cli(*_seal_args(tmp_path, weights, "--register", "http://127.0.0.1:1",
                               "--token-file", str(tmp_path / "t"), "--policy", str(policy)))
    assert proc.returncode == 2
    assert "must start with https://" in one_error_line(proc)
    assert not (tmp_path / "m.sealed").exists()


def _big_state_dict(path: Path) -> None:
    torch.save({f"w{i}": torch.zeros(1024, 1024) for i in range(32)}, path)  # 128 MiB


def test_seal_killed_mid_write_leaves_a_temp_file_the_rerun_removes_and_reports(tmp_path):
    src = tmp_path / "big.pt"
    _big_state_dict(src)
    args = [sys.executable, "-m", "sealedtorch.cli", *_seal_args(tmp_path, src)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.glob(".m.sealed.*.tmp") if p.stat().st_size > 0]
        if temps:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "seal finished before it could be killed"
    assert temps, "no temporary file appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert temps[0].exists() and not (tmp_path / "m.sealed").exists()
    assert (tmp_path / "m.key").is_file()  # the key of the interrupted run

    # rerun with the same --key-out: refused, and told how to reuse the key
    again = run_cli(*_seal_args(tmp_path, src))
    assert again.returncode == 2
    assert f"seal again with --key {tmp_path / 'm.key'}" in one_error_line(again)

    # rerun reusing the key: the stale temp file is removed and reported
    rerun = run_cli("seal", str(src), "-o", str(tmp_path / "m.sealed"), "--model-id", "demo",
                    "--key", str(tmp_path / "m.key"), "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {temps[0]}" in rerun.stdout and "interrupted seal" in rerun.stdout
    assert not list(tmp_path.glob(".m.sealed.*.tmp"))
    assert (tmp_path / "m.sealed").is_file()


def test_a_temp_file_locked_by_a_live_writer_is_not_removed(tmp_path):
    import fcntl

    from sealedtorch.atomicfile import create_locked_temp, remove_stale_temp_files

    target = tmp_path / "m.sealed"
    fd, tmp = create_locked_temp(target)
    try:
        # another process sees it locked: not stale
        code = ("import sys; from sealedtorch.atomicfile import remove_stale_temp_files;"
                "print(len(remove_stale_temp_files(sys.argv[1])))")
        out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.strip() == "0" and Path(tmp).exists()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert [p for p, _ in remove_stale_temp_files(target)] == [Path(tmp)]


def test_seal_json_prints_one_object_and_nothing_else(tmp_path, weights, capsys):
    assert main(_seal_args(tmp_path, weights, "--json")) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["output"] == str(tmp_path / "m.sealed") and doc["model_id"] == "demo"
    assert doc["key_version"] == 1 and doc["tensor_count"] == 2 and doc["key_created"]
    assert doc["registered"] is None and out.count("\n") == 1


def test_seal_key_version_makes_a_key_of_that_version(tmp_path, weights, capsys):
    assert main(_seal_args(tmp_path, weights, "--key-version", "3", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["key_version"] == 3
    assert json.loads((tmp_path / "m.key").read_text())["key_version"] == 3


# --- inspect ------------------------------------------------------------------------------

@pytest.fixture
def sealed(tmp_path: Path, weights: Path) -> Path:
    assert main(_seal_args(tmp_path, weights)) == 0
    return tmp_path / "m.sealed"


def test_inspect_without_a_key_refuses_a_truncated_file(tmp_path, sealed, capsys):
    data = sealed.read_bytes()
    cut = tmp_path / "cut.sealed"
    cut.write_bytes(data[:-10])
    capsys.readouterr()
    assert main(["inspect", str(cut)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "truncated" in line and f"{len(data) - 10} bytes" in line


def test_unseal_to_a_missing_directory_names_the_directory(tmp_path, sealed, capsys):
    capsys.readouterr()
    assert main(["unseal", str(sealed), "--key", str(tmp_path / "m.key"), "-o",
                 str(tmp_path / "nodir" / "out.safetensors"), "-q"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"the directory {tmp_path / 'nodir'} does not exist" in line


def test_inspect_piped_into_head_exits_quietly(tmp_path, weights):
    # many tensors: more output than a pipe holds
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(3000)}, weights)
    assert main(_seal_args(tmp_path, weights)) == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is already gone, as after `| head`
    proc = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "inspect",
                           str(tmp_path / "m.sealed"), "--key", str(tmp_path / "m.key")],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == ""


def test_keys_new_writes_a_0600_key_of_the_given_version(tmp_path, capsys):
    out = tmp_path / "v2.key"
    assert main(["keys", "new", "--model-id", "demo", "--version", "2", "-o", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"model_id": "demo", "key_version": 2, "key_file": str(out)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert main(["keys", "new", "--model-id", "demo", "-o", str(out)]) == 2
    assert "refusing to overwrite" in one_error_line(capsys.readouterr().err)


def test_serve_on_a_port_in_use_says_cannot_listen(tmp_path, sealed):
    import socket

    from sealedtorch.attest import sim

    sim.init_platform(tmp_path / "sim")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--model", f"m={sealed}", "--keycache",
                       str(tmp_path / "none.sock"), "--tee", "sim", "--sim-platform",
                       str(tmp_path / "sim"), "--listen",
                       f"127.0.0.1:{port}", "--log-format", "text")
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr


def test_client_infer_with_an_http_url_says_it_must_be_https(tmp_path):
    proc = run_cli("client", "infer", "--url", "http://127.0.0.1:1", "--policy",
                   str(tmp_path / "p.yaml"), "--model", "m", "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 2
    assert "--url: the URL must start with https://" in one_error_line(proc)
