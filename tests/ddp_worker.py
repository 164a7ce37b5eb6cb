"""The DDP worker of tests/test_module.py: ``python ddp_worker.py RANK WORLD INIT_FILE OUT``."""
from __future__ import annotations

import datetime
import faulthandler
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from excitor_kernels.patch import apply_excitor


def setup():
    """The same adapted model (random prompts, gates, sim projections) and batch in every process."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=97,
                                         initializer_range=0.15))
    apply_excitor(model, num_prompts=5, num_layers=2, sim_rank=4, backend="reference")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 if ".sim_" in name else 1.0)
    return model.train(), torch.randint(0, 97, (4, 9))


def worker(rank, world, init_file, out_path):
    from torch.nn.parallel import DistributedDataParallel

    # A stuck rendezvous or collective ends the worker with its stack in the log instead of hanging the test.
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=180))
    model, batch = setup()
    ddp = DistributedDataParallel(model)
    part = batch.chunk(world)[rank]
    ddp(input_ids=part, labels=part).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out_path)
    # Teardown in order, both ranks together: the DDP reducer goes before its process group, and neither rank
    # leaves while the other still talks to it (a rank freeing gloo state after its peer exited could hang).
    del ddp
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
