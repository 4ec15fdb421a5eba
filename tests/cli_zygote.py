"""A warm start for `tests.helpers.run_cli`: one process per test worker that has imported the CLI and the heavy
libraries (torch, transformers, onnxruntime, onnx) once, and forks a fresh child for every `pipeline` command.

Each child runs the same entry point as `python -m pipeline` (`pipeline.cli.main.main`) with the test's argv,
working directory and environment, its own stdin/stdout/stderr, and its own exit status: what a command does is
unchanged; only the interpreter start and the imports (5-8 s a command on an AVX2 EPYC, ~100 commands in the
suite) are paid once. The zygote imports modules and nothing else (no session, no thread, no cache filled), so a
child starts as a fresh process would after its imports. Tests of what happens at start-up itself (import-time
output of libraries, `import pipeline` staying light, a real terminal) start real processes of their own.

    python -m tests.cli_zygote      # reads one JSON request per line on stdin, answers one JSON line per request
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

PREWARM = ("torch", "transformers", "onnx", "onnxruntime", "pipeline.cli.main")


def _child(request: dict) -> None:
    """In the forked child: become the command, then exit with its status (never return)."""
    code = 1
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(source, target)
            os.close(source)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import pipeline
        from pipeline.cli.main import main

        # What `python -m pipeline` sets, from which click names the program in its messages.
        sys.argv = [str(Path(pipeline.__file__).with_name("__main__.py")), *request["args"]]
        sys.modules["__main__"].__package__ = "pipeline"

        try:
            main()
            code = 0
        except SystemExit as exc:  # as the interpreter maps it: None -> 0, an int, anything else printed -> 1
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    except BaseException:  # what an uncaught exception does in a real process: the traceback, status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    import importlib

    for module in PREWARM:
        importlib.import_module(module)
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


class Zygote:
    """The parent's handle on one zygote process, started on first use."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            root = Path(__file__).resolve().parents[1]
            self.process = subprocess.Popen([sys.executable, "-m", "tests.cli_zygote"], cwd=root, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ),
                                            start_new_session=True)
        return self.process

    def run(self, args: list[str], cwd: Optional[Path], timeout: float) -> subprocess.CompletedProcess[str]:
        process = self._start()
        with tempfile.TemporaryDirectory(prefix="quantpipe-cli-") as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"args": list(args), "cwd": str(cwd or Path.cwd()), "env": dict(os.environ),
                       "stdout": str(out), "stderr": str(err)}
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            if not ready:
                self.close()
                raise subprocess.TimeoutExpired(["pipeline", *args], timeout)
            returncode = json.loads(process.stdout.readline())["returncode"]
            return subprocess.CompletedProcess(["pipeline", *args], returncode,
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        """Stop the zygote and any command it is running (they share its process group)."""
        if self.process is not None:
            import signal

            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None


ZYGOTE = Zygote()
atexit.register(ZYGOTE.close)


if __name__ == "__main__":
    serve()
