"""BatchNorm over every process's images, so that training on N processes normalises with the
statistics of the whole batch, as one process would."""

import torch


class AllReduceBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the whole batch's across processes.

    torch.nn.SyncBatchNorm does this on GPUs only (it refuses CPU tensors), so this class is
    written here for process groups on the CPU (gloo). Each process's per-channel sums are
    summed with torch.distributed.nn's differentiable all_reduce, so the backward pass is the
    whole batch's too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C, xf = x.shape[1], x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_tensor([x.numel() / C])])
        total = all_reduce(local)  # (2C + 1,): sums over every process's images
        count = total[-1]
        mean = total[:C] / count
        var = total[C : 2 * C] / count - mean * mean  # biased: what the batch is normalised with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), momentum)  # unbiased, as BatchNorm keeps
        shape = (1, C, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronise_batchnorm(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Every BatchNorm2d made to normalise with the statistics of all processes' images:
    torch.nn.SyncBatchNorm on CUDA, AllReduceBatchNorm2d elsewhere. Parameters and buffers are
    kept (the same tensors), so the state dict and the saved model are unchanged."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                synced.weight, synced.bias = child.weight, child.bias
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
                synced.train(child.training)
                setattr(parent, name, synced)
    return model
