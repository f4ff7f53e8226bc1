"""A tensor-parallel rank's process: `python -m wde.core.parallel.tp_worker`, its arguments pickled on stdin.

Started as a plain subprocess rather than through multiprocessing, so the user's main script is never
imported again in it. It exits when rank 0 says stop, when rank 0's process disappears, or on any error (which
it writes to its error file first, for rank 0 to raise).
"""
import os
import pickle
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

from wde.core.orphans import exit_with_parent
from wde.core.parallel.distributed import destroy_tensor_parallel, init_tensor_parallel


def main() -> None:
    args = pickle.load(sys.stdin.buffer)
    exit_with_parent(1)
    try:
        from wde.core.parallel.multiproc_executor import rank_device, serve_steps
        rank, world_size, config = args["rank"], args["world_size"], args["config"]
        if config.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        config = replace(config, device=rank_device(config, rank))
        store = dist.TCPStore("127.0.0.1", args["port"], world_size, is_master=False)
        store.set(f"ready-{rank}", "1")  # rank 0 waits for this, watching that we are still alive
        init_tensor_parallel(rank, world_size, config.device, store, config.args.enable_expert_parallel)
        serve_steps(config, args["components"], rank)
        destroy_tensor_parallel()
    except BaseException:
        with open(args["error_file"], "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)  # our sockets close at once, so the other ranks' collectives fail instead of waiting
    os._exit(0)


if __name__ == "__main__":
    main()
