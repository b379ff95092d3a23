"""One step of BEAR (trie mask) on each of 2 processes (gloo, CPU): `Trainer` with
apply_bear_loss, or TRL's SFTTrainer through `bear_kernels.trl.BEARSFTTrainer`.

Run by test_hf_stack.py through torchrun: `_hf_ddp_worker.py OUT_DIR GRAD_FILE {trainer,trl}`;
rank 0 saves the step's gradient of the LoRA parameters (after DDP's all-reduce) to GRAD_FILE.
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
    word_tokenizer,
)


def _trainer(model, out_dir: str, capture, how: str):
    mask_fn, options = item_trie().labels_allowed_mask, LOSSES["bear"][1]
    ddp = {"average_tokens_across_devices": True, "ddp_backend": "gloo"}
    if how == "trainer":
        apply_bear_loss(model, allowed_mask_fn=mask_fn, **options)
        args = training_args(out_dir, 2, 2, **ddp)
        data, extra = examples(8, seed=19), {}
    else:
        from datasets import Dataset
        from trl import SFTConfig

        from bear_kernels.trl import BEARSFTTrainer

        skip = {"dataset_kwargs": {"skip_prepare_dataset": True}}
        args = training_args(out_dir, 2, 2, args_cls=SFTConfig, **ddp, **skip)
        data = Dataset.from_list(examples(8, seed=19))
        extra = {"processing_class": word_tokenizer(), "allowed_mask_fn": mask_fn,
                 "bear_options": options}  # fmt: skip
    cls = Trainer if how == "trainer" else BEARSFTTrainer
    return cls(model=model, args=args, train_dataset=data, data_collator=collate,
               callbacks=[capture], **extra)  # fmt: skip


def main(out_dir: str, grad_file: str, how: str) -> None:
    model = tiny_lora()
    capture = GradCapture()
    trainer = _trainer(model, out_dir, capture, how)
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
    main(sys.argv[1], sys.argv[2], sys.argv[3])
