"""Every remote block as one differentiable operation, so that `loss.backward()` reaches through the swarm.

Forward runs the chain and remembers each hop's blocks and input. Backward walks the hops from last to first and
asks the hop's server for the gradients w.r.t. that input (from the graph it kept of the forward when the client
trains, or by recomputing its part of the forward; its weights stay frozen), plus those w.r.t. the deep prompts and
LoRA weights it was sent. A hop whose server has gone is retried elsewhere; the hops already done are not redone.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from meadow.client.tuning import RemoteTuning


class RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sequence, position_ids, key_mask, tuning: RemoteTuning, training: bool, hidden, prompts, lora_flat):
        tuning = tuning.with_tensors(
            None if prompts is None else prompts.detach(), None if lora_flat is None else lora_flat.detach()
        )
        output, hops = sequence.forward_hops(hidden.detach(), position_ids, key_mask, tuning, training)
        ctx.sequence, ctx.position_ids, ctx.key_mask, ctx.tuning, ctx.hops = sequence, position_ids, key_mask, tuning, hops
        ctx.device = hidden.device
        return output.to(hidden.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        tuning = ctx.tuning
        grad_prompts = None if tuning.prompts is None else torch.zeros_like(tuning.prompts)
        grad_lora = None if tuning.lora_flat is None else torch.zeros_like(tuning.lora_flat)
        grad = grad_output.contiguous()
        for hop, hidden, graph_id in reversed(ctx.hops):
            blocks = hop.blocks
            grad, prompts, lora = ctx.sequence.backward_hop(
                hop, hidden, grad, ctx.position_ids, ctx.key_mask, tuning, graph_id
            )
            if prompts is not None:
                grad_prompts[blocks.start : blocks.end] += prompts.to(grad_prompts.device)
            if lora is not None:
                start, end = tuning.lora_range(blocks)
                grad_lora[start:end] += lora.to(grad_lora.device)
        return None, None, None, None, None, grad.to(ctx.device), grad_prompts, grad_lora
