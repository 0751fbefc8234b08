"""`lcm` under accelerate's FSDP2 on CPU processes, for the tests: `accelerate launch --config_file
configs/accelerate/fsdp.yaml ... tests/fsdp_on_cpu.py distill ...`.

accelerate turns `distributed_type: FSDP` into FSDP only on accelerators: its `AcceleratorState` sets
DistributedType.FSDP for MULTI_GPU, MULTI_NPU, MULTI_XPU, ... and leaves a gloo run at MULTI_CPU, dropping the plugin
(accelerate 1.15, state.py). PyTorch's `fully_shard` itself runs on CPU over gloo. After accelerate's own set-up, this
sets what it would have set on a GPU: the FSDP distributed type and the plugin read from the launcher's environment
(the yaml's settings). Everything else, accelerate's FSDP2 preparation, clipping, mixed precision, and the training loop,
runs unchanged.

LCM_TEST_KILL_AFTER_CHECKPOINT=N: the main process SIGKILLs itself right after the checkpoint of step N is complete (a
crash at a known step; torchrun then ends the other process).
"""

import os
import signal
import sys

import accelerate
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set from the yaml
        if self.state.mixed_precision != "no":
            plugin.set_mixed_precision(self.state.mixed_precision)
        # Both shared states: accelerate's later `AcceleratorState()` calls copy PartialState's distributed type over
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


accelerate.Accelerator.__init__ = _init_with_fsdp_on_cpu

kill_after = os.environ.get("LCM_TEST_KILL_AFTER_CHECKPOINT")
if kill_after:
    from latent_consistency.training import checkpoint

    _save = checkpoint.save_checkpoint

    def _save_then_die(run_dir, step, *args, **kwargs):
        path = _save(run_dir, step, *args, **kwargs)
        if step == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save_checkpoint = _save_then_die

if __name__ == "__main__":
    from latent_consistency.cli import end_process, main

    sys.exit(end_process(main(sys.argv[1:])))
