"""The optimisers and the learning-rate schedule: Nesterov SGD for the convolutional backbone,
AdamW for the transformer, each with transformers' warmup-and-cosine schedule."""

import warnings

import torch

SGD_MOMENTUM = 0.9
ADAMW_BETAS = (0.9, 0.999)


def parameter_groups(named_parameters, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, position embeddings or the CLS token."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_parts(model) -> dict:
    """The model's parameters by part, as (name, parameter) lists: "backbone" (the whitening
    layer's bias, the convolutions and their BatchNorms: scale invariant, the part SGD trains
    well) and "transformer" (token projections, CLS token, position embeddings, blocks, final
    norm and head)."""
    embeddings = getattr(model, model.base_model_prefix, model).embeddings
    modules = [module for module in (embeddings.whitening, embeddings.backbone) if module is not None]
    in_backbone = {id(p) for module in modules for p in module.parameters()}
    parts = {"backbone": [], "transformer": []}
    for name, parameter in model.named_parameters():
        parts["backbone" if id(parameter) in in_backbone else "transformer"].append((name, parameter))
    return parts


def make_optimizers(model, optimizer) -> list[torch.optim.Optimizer]:
    """[Nesterov SGD for the backbone, AdamW for the transformer] from OptimizerSettings. SGD's
    weight decay is added to the gradient (airbench's values, about 1e-3); AdamW's is
    decoupled (about 0.05)."""
    parts = model_parts(model)
    return [
        torch.optim.SGD(parameter_groups(parts["backbone"], optimizer.weight_decay), lr=optimizer.learning_rate,
                        momentum=SGD_MOMENTUM, nesterov=True),
        torch.optim.AdamW(parameter_groups(parts["transformer"], optimizer.transformer_weight_decay),
                          lr=optimizer.transformer_learning_rate, betas=ADAMW_BETAS),
    ]


def make_scheduler(optimizer, warmup_ratio: float, total_steps: int, num_processes: int = 1, completed_steps: int = 0):
    """transformers' cosine schedule with linear warmup over `total_steps` optimisation steps,
    standing at `completed_steps`, so a schedule re-fitted mid-run goes on from where the run
    is. Steps count once per process, Accelerate's convention for a prepared scheduler (as in
    the transformers no_trainer examples)."""
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=round(warmup_ratio * total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )
    if completed_steps:
        scheduler.last_epoch = completed_steps * num_processes - 1
        with warnings.catch_warnings():  # this step places the new schedule mid-run; no update is skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
            scheduler.step()  # sets each group's learning rate for step `completed_steps`
    return scheduler
