"""``compress device-server``: a TVM RPC server on a device, for ``compress profile/check --rpc``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from edgecompress.compress.cli.common import say

if TYPE_CHECKING:
    from edgecompress.runtimes.tvm_rpc import DeviceServer


def register(app: typer.Typer) -> None:
    @app.command("device-server")
    def device_server_cmd(
        port: int = typer.Option(9090, "--port", "-p", min=1, max=65535, help="Port to listen on (exactly this one)."),
        key: str = typer.Option(..., "--key", "-k", help="Key that clients must name to connect (required)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless set (0.0.0.0: all)."),
        tracker: str | None = typer.Option(None, "--tracker", help="Register with a TVM RPC tracker host:port."),
        emulate: str | None = typer.Option(
            None, "--emulate", metavar="ARCH",
            help="Serve an emulated device instead: 'arm64' runs the server under qemu in the root that "
            "'make device-emu' builds (outputs are real ARM64 results; latency is meaningless).",
        ),
    ) -> None:
        """Serve this machine as a device: clients upload TVM libraries and time them here.

        Binds 127.0.0.1 unless --host is given, and only accepts clients that name --key. Stop it
        with Ctrl-C (or SIGTERM): its worker processes are ended with it. With --emulate arm64 the
        device is this machine emulating ARM64 (CI without a phone): check outputs with it, never speed.
        """
        import signal

        from edgecompress.compress.errors import ConfigError

        if not key.strip():
            raise ConfigError("--key must not be empty: clients identify the device by it")
        warning = ""
        if emulate:
            from edgecompress.runtimes.emulator import EmulatedDevice

            device = EmulatedDevice.find(emulate.strip().lower())
            server = device.server(port, key=key, host=host, tracker=tracker)  # raises unless built
            warning = device.warning()
            say(f"starting the emulated {device.arch} device from {device.root} (qemu: this takes a minute)")
        else:
            server, note = _native_server(port, key=key, host=host, tracker=tracker)
            if note:
                say(note)

        def _stop(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            server.start()
            say(f"device server listening on {server.address} (key {key!r}); Ctrl-C to stop")
            if warning:
                say(f"warning: {warning}")
            if host not in ("127.0.0.1", "localhost", "::1"):
                say(f"warning: bound to {host}: any machine that can reach it and knows the key can run code here")
            code = server.wait()
            if code:
                say(f"device server exited with code {code}: {server.output()}", stderr=True)
        except KeyboardInterrupt:
            say("stopping the device server")
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)


def _native_server(port: int, *, key: str, host: str, tracker: str | None) -> tuple[DeviceServer, str]:
    """This machine's own device server; on a machine with an NVIDIA driver, one that can load
    CUDA artifacts (kernels compiled at load, sessions spawned since CUDA does not survive fork)."""
    import sys
    import tempfile
    from pathlib import Path

    from edgecompress.runtimes.cuda_jit import cuda_driver_present, write_server_python
    from edgecompress.runtimes.tvm_rpc import DeviceServer

    if not cuda_driver_present():
        return DeviceServer(port, key=key, host=host, tracker=tracker), ""
    folder = Path(tempfile.mkdtemp(prefix="edgecompress-device-"))
    python = write_server_python(folder, sys.executable)
    return DeviceServer(port, key=key, host=host, tracker=tracker, python=str(python)), (
        "CUDA driver found: CUDA artifacts are compiled for this GPU when they load "
        "(nvcc or NVRTC needed here); each session runs in a fresh process"
    )
