"""torch.distributed with FSDP2: one process per device, launched by torchrun.

    torchrun --nproc_per_node=8 clm/run_clm.py backend=cuda ...          # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        --rdzv-id=$JOB_ID clm/run_clm.py backend=cuda ...                   # on every node

`select_backend` picks this backend whenever WORLD_SIZE > 1. `backend=cuda` uses NCCL and the
GPU `LOCAL_RANK`; `backend=cpu` runs the very same code in CPU processes over gloo, which is how
the tests (tests/test_distributed.py) cover it on a laptop.

Sharding (ZeRO-3): `fully_shard` on every decoder layer (the classes in the model's
`_no_split_modules`) and on the root (embeddings, final norm, LM head). Each rank keeps 1/N of
every parameter (dim 0) and of its gradient and AdamW moments; a layer's weights are
all-gathered just before it runs and freed after, in the forward and again in the backward.

Data: every rank reads the same deterministic stream, a whole global batch per step, and keeps
its rows of each global micro-batch (`local_rows`); together the ranks consume exactly the global
batch, as one process would. Simple and exactly reproducible, at the cost of every rank
tokenizing the whole batch (not measured at benchmark scale; pre-tokenized data or strided
reading would remove it). The eval set is split the same way and its NLL sum and token count are all-reduced.

Gradients: the trainer's loss on a rank is sum(NLL of its rows) / (target tokens of the whole
global batch, all-reduced), so the true gradient is the SUM of the ranks' gradients. FSDP's
default is the average; every FSDP unit is switched to a plain sum (divide factor 1, sum-only
collectives, which gloo also supports). The gradients are reduce-scattered after every
micro-batch's backward and accumulate in the shards. Gradient clipping uses the global norm:
per-rank sums of squares of the local shards, all-reduced (`clip_grad_norm_`). The MoE
load-balancing loss is each rank's own (over its rows) and enters the summed gradient with
weight 1/world: the mean over ranks, as in Megatron; `train/aux_loss` logs that mean. The
`moe/*` statistics are rank 0's (its rows; with expert parallelism, its ep group's).

Mixed precision: with `model.dtype=bfloat16` the parameters (and so AdamW's state: the master
weights) are kept in fp32; FSDP casts them to bf16 for the forward and backward
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), so the reduce-scatter of
gradients runs in fp32. float16 would need loss scaling and is refused. AdamW is fused on CUDA
(clm/optim.py).

Activation checkpointing (`model.gradient_checkpointing=true`): HF's, enabled in clm/model.py.
transformers 5 checkpoints each decoder layer's `forward`, not `__call__`, so FSDP's hooks stay
outside the checkpoint and the recomputation reuses the all-gathered weights of the backward.

Expert parallelism (`expert_parallelism=ep > 1`): a 2-D mesh (dp_shard, ep); expert weights are
DTensors sharded over ep and the tokens reach their experts by an all-gather / reduce-scatter in
each MoE layer. See clm/expert_parallel.py. Every rank still reads its own rows (the ep axis
splits the data too, as on XLA), so `data_parallel_size` is the world size.

Checkpoints: clm/checkpoint.py's DCP save/load, one shard per rank, every rank taking part
(multi-node: `save_dir` must be a filesystem every node sees).

Initialization (`build_model`): `wrap_model` shards the model while it is
still on the meta device, each rank allocates only its shards, and the weights are then made a
decoder layer at a time, each rank copying its slice into its shards before the next layer is
made: no rank or GPU holds the whole model, and the weights are bitwise those one process would
make. A random init draws on the rank's device, every number of the layer as one process on it
would (a GPU holds one layer more for the moment: Mixtral-8x22B, 2.5G parameters). From a
checkpoint each rank reads only its slice of each tensor (1/N of the checkpoint), on the CPU.

Not done: tensor, context and pipeline parallelism (ConfigError), HSDP (replicate across nodes,
shard within), torch.compile, and overlap tuning (prefetch limits, reshard-after-forward
choices).
"""

from __future__ import annotations

import math
import os
import platform

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from clm.backends import Backend
from clm.config import ConfigError
from clm.spec import ModelSpec
from clm.watchdog import collective_timeout

# the dtypes `model.dtype` may name here, as the compute dtype of the mixed-precision policy
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: HF lists their classes in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__}: no decoder layers found to shard (its _no_split_modules "
            f"is {sorted(names)})"
        )
    return layers


class FsdpBackend(Backend):
    name = "fsdp"
    # the forward and backward all-gather weights and reduce-scatter gradients as they go
    compute_phase = "device or an FSDP collective"

    def __init__(self, cfg: DictConfig, device_type: str):
        # parallelism it does not run is refused before it is built (refuse_unimplemented)
        if cfg.model.dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"model.dtype={cfg.model.dtype}: the torchrun (FSDP2) backend trains float32 or "
                "bfloat16 (fp32 master weights, bf16 compute); float16 would need loss scaling"
            )
        self.compute_dtype = COMPUTE_DTYPES[cfg.model.dtype]
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            self.dist_backend = "nccl"
        else:
            device = torch.device("cpu")
            self.dist_backend = "gloo"
        super().__init__(device)
        if not dist.is_initialized():
            # rendezvous from torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE), or
            # each process started by hand with those variables; a collective waits at most
            # first_step_timeout_s (clm/watchdog.py bounds the steps after warm-up)
            dist.init_process_group(
                backend=self.dist_backend,
                device_id=device if device_type == "cuda" else None,
                timeout=collective_timeout(cfg),
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.ep = int(cfg.expert_parallelism)
        if self.world_size % self.ep:
            raise ConfigError(
                f"expert_parallelism={self.ep} does not divide the {self.world_size} processes "
                "(the mesh is world / expert_parallelism x expert_parallelism)"
            )
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:
            self.mesh = init_device_mesh(
                device_type,
                (self.world_size // self.ep, self.ep),
                mesh_dim_names=("dp_shard", "ep"),
            )
            # the non-expert weights are sharded over every rank: the flattened mesh
            self.dp_mesh = self.mesh["dp_shard", "ep"]._flatten("dp")
        else:
            self.mesh = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
            self.dp_mesh = self.mesh
        # each rank computes its own rows: the batch is split over every process
        self.data_parallel_size = self.world_size
        self.local_data_parallel_size = 1

    # ---- model -----------------------------------------------------------------------------
    def build_model(self, spec: ModelSpec, seed: int) -> torch.nn.Module:
        """The model sharded (`wrap_model`, FSDP2's `fully_shard`) before any weight exists.

        `wrap_model` runs on the meta-device model, and each process allocates only its shards
        on its device (`to_empty`). The weights are then made exactly as `clm.model.build_model`
        makes them for one process, a piece (a decoder layer) at a time (`materialize`:
        randomly initialized on the device, as one process would with its generator, or read
        from safetensors on the CPU), and each process copies its part of each tensor into its
        shard (`LocalParts`) before the next piece is made: no process or device ever holds the
        whole model, and every process gets the numbers one process would. From a checkpoint,
        each process reads only its parts' bytes.
        """
        from clm import model as model_lib

        model = self.wrap_model(model_lib.build_meta_model(spec))
        model.to_empty(device=self.device)
        parts = LocalParts(model)
        model_lib.build_model(spec, self.device, seed, parts, parts.region)
        unfilled = [name for name, t in parts.targets.items() if id(t) not in parts.filled]
        if unfilled:  # to_empty left them uninitialized: never train on that
            raise RuntimeError(f"the sharded model's {', '.join(unfilled[:3])} were never filled")
        return model

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import Shard

        policy = None
        expert_policy = None
        if self.compute_dtype is not None:
            model = model.float()  # fp32 master weights; FSDP casts them for compute
            policy = MixedPrecisionPolicy(
                param_dtype=self.compute_dtype, reduce_dtype=torch.float32
            )
            # the experts' own unit must not cast its inputs: the routing weights stay fp32,
            # as they are inside a decoder layer without expert parallelism
            expert_policy = MixedPrecisionPolicy(
                param_dtype=self.compute_dtype,
                reduce_dtype=torch.float32,
                cast_forward_inputs=False,
            )
        experts = []
        if self.ep > 1:
            from clm import expert_parallel

            experts = expert_parallel.shard_experts(model, self.mesh["ep"])
        for layer in decoder_layers(model):
            for module in experts:
                if any(m is module for m in layer.modules()):
                    # ep already splits the expert dim (0); FSDP splits the next one, so no
                    # dimension is sharded twice (no strided sharding for checkpoints)
                    fully_shard(
                        module,
                        mesh=self.mesh["dp_shard"],
                        mp_policy=expert_policy or MixedPrecisionPolicy(),
                        shard_placement_fn=lambda _: Shard(1),
                    )
            fully_shard(layer, mesh=self.dp_mesh, mp_policy=policy or MixedPrecisionPolicy())
        # the root's parameters (embeddings, final norm, head) are needed again right away by the
        # backward: keep them gathered after the forward
        fully_shard(
            model,
            mesh=self.dp_mesh,
            mp_policy=policy or MixedPrecisionPolicy(),
            reshard_after_forward=False,
        )
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # sum, not average: the loss is already normalized by the global token count
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    # ---- data ------------------------------------------------------------------------------
    def local_rows(
        self, batch: dict[str, torch.Tensor], micro_batches: int = 1
    ) -> dict[str, torch.Tensor]:
        """Rows [r*p, (r+1)*p) of each of the `micro_batches` global micro-batches (rank r)."""
        out = {}
        for key, value in batch.items():
            total = value.shape[0]
            per_step = micro_batches * self.data_parallel_size
            assert total % per_step == 0, (key, total, micro_batches, self.data_parallel_size)
            rows = total // per_step
            split = value.reshape(micro_batches, self.data_parallel_size, rows, *value.shape[1:])
            out[key] = split[:, self.rank].reshape(micro_batches * rows, *value.shape[1:])
        return out

    # ---- collectives -----------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """The global L2 norm over the sharded gradients, then one scale of every gradient.

        FSDP (and expert parallelism) shard every gradient with no replication, so each element
        lives on exactly one rank: the norm is the square root of the all-reduced sum of the
        local shards' sums of squares, in fp32, as `Backend.clip_grad_norm_` computes it on one
        device. (torch's `clip_grad_norm_` cannot stack DTensors of two meshes, as the experts'
        and the rest are with expert parallelism.)
        """
        from torch.distributed.tensor import DTensor, Shard

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = []
        for grad in grads:
            if isinstance(grad, DTensor):
                assert all(isinstance(pl, Shard) for pl in grad.placements), grad.placements
                assert grad.device_mesh.size() == self.world_size, grad.device_mesh
                grad = grad.to_local()
            local.append(grad.detach().float().square().sum())
        squares = torch.stack(local).sum() if local else torch.zeros((), device=self.device)
        total = self.all_reduce_sum(squares).sqrt()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(
                [g.to_local() if isinstance(g, DTensor) else g for g in grads], coef
            )
        return total

    def any_process(self, flag: bool) -> bool:
        return bool(self.all_reduce_sum(torch.tensor(int(flag), device=self.device)).item())

    def barrier(self) -> None:
        if self.dist_backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    @property
    def parallelism(self) -> dict[str, int]:
        return {"tensor": 1, "expert": self.ep, "pipeline": 1, "context": 1}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_description(self) -> str:
        parts = [self.dist_backend, "FSDP2"]
        if self.ep > 1:
            parts.append(f"expert parallel {self.ep} x data {self.world_size // self.ep}")
        if self.compute_dtype is not None:
            parts.append("bf16 compute, fp32 master weights")
        if self.device.type == "cuda":
            where = torch.cuda.get_device_name(self.device)
        else:
            where = f"cpu ({platform.processor() or platform.machine()}, "
            where += f"{torch.get_num_threads()} threads each)"
        return f"{self.world_size} processes ({', '.join(parts)}) on {where}"

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class LocalParts:
    """A `materialize` place into a sharded model: this process's part of each new tensor is
    copied into the sharded model's tensor of the same name (a DTensor's local shard, or a
    whole unsharded buffer), and the new tensor dropped (a meta stand-in is returned).

    `region` is that part as a box, so a checkpoint reader reads only it."""

    def __init__(self, model: torch.nn.Module):
        self.targets = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self.filled: set[int] = set()

    def region(self, name: str, shape: tuple = ()) -> tuple[slice, ...] | None:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        target = self.targets[name]
        if not isinstance(target, DTensor):
            return None
        local_shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        return tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))

    @torch.no_grad()
    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self.targets[name]
        box = self.region(name)
        if box is None:
            target.copy_(tensor)
        else:
            target.to_local().copy_(tensor[box])
        self.filled.add(id(target))
        return torch.empty_like(tensor, device="meta")
