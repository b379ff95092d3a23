"""One Trainer step of BEAR (apply_bear_loss, trie mask) on each of 2 processes (gloo, CPU).

Run by test_hf_stack.py through torchrun: `_hf_ddp_worker.py OUT_DIR GRAD_FILE`; rank 0 saves the
step's gradient of the LoRA parameters (after DDP's all-reduce) to GRAD_FILE.
"""

import gc
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

from bear_kernels.transformers import apply_bear_loss
from tests._helpers_hf import (
    LOSSES,
    GradCapture,
    collate,
    examples,
    item_trie,
    tiny_lora,
    training_args,
)


def main(out_dir: str, grad_file: str) -> None:
    model = tiny_lora()
    apply_bear_loss(model, allowed_mask_fn=item_trie().labels_allowed_mask, **LOSSES["bear"][1])
    capture = GradCapture()
    args = training_args(out_dir, 2, 2, average_tokens_across_devices=True, ddp_backend="gloo")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples(8, seed=19),
        data_collator=collate,
        callbacks=[capture],
    )
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save(capture.grad, grad_file)
    # The DDP-wrapped model goes while the process group is alive: released only when main returned,
    # after destroy_process_group, it hung a rank's exit about one launch in ten. Then leave
    # together: a rank whose gloo peer has already exited can abort in its own teardown
    # ("terminate called without an active exception", SIGABRT), failing the launch.
    del trainer, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
