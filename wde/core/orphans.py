"""What wde's own child processes (tensor-parallel ranks, grammar compilers) share: they end with their parent."""
import os
import threading
import time


def exit_with_parent(code: int) -> None:
    """A daemon thread that ends this process (with `code`) once the process that started it is gone, however
    that one ended (a SIGKILL runs none of its clean-up)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(code)
    threading.Thread(target=watch, daemon=True).start()
