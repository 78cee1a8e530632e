"""SIGINT/SIGTERM for the package's processes (node, replay): a handler of our own that only
asks the process to stop, instead of rclpy's, which raises KeyboardInterrupt wherever the main
thread happens to be (inside a message's deserialisation, pybind turns it into a TypeError;
after the context is gone, a worker still publishing fails with "context is invalid")."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def init_without_signal_handlers(args: list[str] | None = None) -> None:
    """``rclpy.init`` without rclpy's own SIGINT/SIGTERM handlers (``signal_handler_options``
    exists from Humble on)."""
    import rclpy

    try:
        from rclpy.signals import SignalHandlerOptions
    except ImportError:
        rclpy.init(args=args)
    else:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)


def on_stop_signals(callback: Callable[[], None]) -> None:
    """Call ``callback()`` on SIGINT and SIGTERM (Ctrl-C, ``ros2 launch`` stopping, ``kill``);
    only from the main thread (``signal.signal``'s rule; elsewhere nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(_signum, _frame) -> None:
        callback()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on: for a process whose clean exit is done. A
    further signal arriving while the interpreter finalises, where Python puts the default
    handlers back, would otherwise end it as "killed by SIGTERM"."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
