"""Spot-checks: is a server computing its blocks honestly?

Now and then (ClientConfig.verify: a fraction of inference steps and of forward/backward requests) the client sends
the same request to another server that holds all of the same blocks and compares the two results, per token, within
a tolerance that fits the servers' dtypes and quantization. On a mismatch a third server decides: the server in the
minority is banned for a long time (ClientConfig.verify_ban_seconds) and the reason is logged with the peer ids.
A server that cannot be checked (nobody else holds its blocks) is trusted; a mismatch nobody can decide is logged.

For an inference step, the second server does not need the session's KV cache: it gets the segment's whole history
in one rpc_forward (no cache, nothing reserved on it) and its output is compared with every output the segment has
returned so far, so one check also catches a server that cheated at any earlier step. Its cost grows with the
session: one prefill of the history through the segment's blocks on another server, once per checked step.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Awaitable, Callable, Sequence

import torch
from hivemind.p2p import PeerID

from meadow.client.routing import Hop
from meadow.client.transport import BadReply, is_server_failure

logger = logging.getLogger(__name__)

# Largest honest per-token relative difference, measured on SmolLM2-135M's 30 blocks: one prefill against one
# decoded token at a time (3e-6 in float32, 7e-3 in float16, 4.3e-2 in bfloat16: python -m
# benchmarks.spot_check_tolerance --dtype D) and against float32 (1.4e-2 for float16, 0.11 for bfloat16). The
# tolerances leave a margin of about 3 over what another machine, kernel or batch composition adds; a server in
# another dtype, or with other quantized weights, is compared more loosely.
DTYPE_TOLERANCE = {"float32": 1e-3, "float16": 0.03, "bfloat16": 0.13}
# Added for the two servers' quantizations, measured the same way. nf4 against nf4: as close as unquantized in
# float32, 1e-2 in float16 and 7.3e-2 in bfloat16. LLM.int8() picks the columns it keeps unquantized from the whole
# batch, so an int8 server's decoded tokens differ from its own prefill of them: 0.22-0.25 in-process, 0.30 through a
# swarm, and 0.26-0.29 from unquantized outputs. nf4 against anything else differs by up to 1.0, as much as an
# all-zero output would: such servers cannot check each other, and are never asked to (a pair not listed here).
QUANT_TOLERANCE = {("none", "none"): 0.0, ("nf4", "nf4"): 0.1, ("int8", "int8"): 0.9, ("int8", "none"): 0.9}
# added when the client chose a lossy wire format itself (ClientConfig.wire): a spot-check's one forward of a session's
# history is rounded differently from its steps. blockwise8: per-token error ~2% (up to 5% beside outliers), both ways.
WIRE_TOLERANCE = {"float32": 0.0, "float16": 0.01, "bfloat16": 0.05, "blockwise8": 0.15}
ROW_FLOOR = 1e-2  # a token's difference is relative to at least this fraction of the largest token's norm
# (gradients of some tokens are near zero; their roundoff is relative to the others')


class WrongOutputs(BadReply):
    """Well-formed outputs that two other servers, given the same request, agree are wrong."""

    what = "wrong outputs"


def tolerance(a: dict, b: dict) -> float:
    """How far two honest servers' outputs may lie apart (per-token relative difference), from their announced
    dtype and quant (ServerInfo fields, as dicts; an unknown dtype: the loosest); infinite for servers whose
    quantizations are too far apart to check each other (or unknown)."""
    dtypes = (a.get("dtype", "bfloat16"), b.get("dtype", "bfloat16"))
    quants = tuple(sorted((a.get("quant", "none"), b.get("quant", "none"))))
    limit = max(DTYPE_TOLERANCE.get(dtype, max(DTYPE_TOLERANCE.values())) for dtype in dtypes)
    limit *= 1 if dtypes[0] == dtypes[1] else 2
    return limit + QUANT_TOLERANCE.get(quants, math.inf)


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative difference between a and b along their last dimension: per token for hidden states."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    a, b = (t.detach().float().reshape(-1, t.shape[-1] if t.ndim else 1) for t in (a, b))
    difference = (a - b).norm(dim=-1)
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1))
    scale = scale.clamp_min(ROW_FLOOR * float(scale.max()) + torch.finfo(torch.float32).tiny)
    return float((difference / scale).max())


def disagreement(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> float:
    """The largest mismatch over corresponding tensors of two results."""
    if len(x) != len(y):
        return math.inf
    return max((mismatch(a, b) for a, b in zip(x, y)), default=0.0)


Recompute = Callable[[Hop], Awaitable[list[torch.Tensor]]]  # the same request for the same blocks, on another server


class SpotChecker:
    """Decides when to check and runs the checks for one RemoteSequence (its routes, bans and config)."""

    MAX_WITNESSES = 3  # servers asked at most per check: a second opinion, a decider, and one spare if one fails

    def __init__(self, sequence):
        self.sequence = sequence
        self.checked = self.unchecked = self.caught = 0  # how many checks passed or found a cheat, and were skipped

    def due(self) -> bool:
        """Whether to check this request (or inference step): true for a `verify` fraction of them, at random."""
        rate = self.sequence.config.verify
        return rate > 0 and (rate >= 1 or random.random() < rate)

    def witnesses(self, hop: Hop) -> list[PeerID]:
        """Other servers that hold all of `hop`'s blocks, quantized closely enough to hop's server's to check it, in
        the order to ask them: those of the same dtype and quant first (their results agree most closely), then those
        that answered our ping; random within."""
        servers, banned, rtt = self.sequence.usable_servers(), self.sequence.banned(), dict(self.sequence.rtt)
        kind = _kind(servers.get(hop.peer))
        found = [
            peer for peer, info in servers.items()
            if peer != hop.peer and peer not in banned and info.start <= hop.blocks.start and hop.blocks.end <= info.end
            and math.isfinite(self._tolerance(hop.peer, peer))
        ]  # fmt: skip
        random.shuffle(found)
        found.sort(key=lambda peer: (_kind(servers[peer]) != kind, not math.isfinite(rtt.get(peer, 0.0))))
        return found[: self.MAX_WITNESSES]

    async def check(self, hop: Hop, result: Sequence[torch.Tensor], recompute: Recompute) -> None:
        """Check `result`, which hop's server returned, against other servers' `recompute`; raise WrongOutputs if
        two others agree it is wrong. A second opinion that the decider outvotes gets its server banned here."""
        witnesses = self.witnesses(hop)
        second = await self._opinion(hop, witnesses, recompute)
        if second is None:
            self.unchecked += 1
            return
        peer, other = second
        difference, limit = disagreement(result, other), self._tolerance(hop.peer, peer)
        if difference <= limit:
            self.checked += 1
            return
        third = await self._opinion(hop, witnesses, recompute)
        if third is None:
            logger.warning(
                f"servers {hop.peer} and {peer} disagree on blocks {hop.blocks} (relative difference {difference:.3g}, "
                f"tolerance {limit:.3g}) and no third server could decide; trusting both for now"
            )
            return
        judge, deciding = third
        primary_right = disagreement(result, deciding) <= self._tolerance(hop.peer, judge)
        other_right = disagreement(other, deciding) <= self._tolerance(peer, judge)
        if primary_right == other_right:
            logger.warning(f"servers {hop.peer}, {peer} and {judge} disagree on blocks {hop.blocks}; nobody banned")
            self.checked += 1
            return
        self.caught += 1
        wrong, right = (peer, hop.peer) if primary_right else (hop.peer, peer)
        error = WrongOutputs(
            f"for blocks {hop.blocks}, unlike those of {right} and {judge}, which agree "
            f"(relative difference {difference:.3g}, tolerance {limit:.3g})",
            wrong,
        )
        if wrong != hop.peer:
            self.sequence.ban(wrong, error)
            return
        raise error

    async def _opinion(
        self, hop: Hop, witnesses: list[PeerID], recompute: Recompute
    ) -> tuple[PeerID, list[torch.Tensor]] | None:
        """The next witness's result for hop's blocks (a witness that fails is banned as usual and the next one
        asked); None if none is left, or the request is one they refuse (the check is skipped, not the work)."""
        while witnesses:
            peer = witnesses.pop(0)
            try:
                return peer, await recompute(Hop(peer, hop.blocks))
            except Exception as e:
                if not is_server_failure(e):
                    logger.info(f"spot-check of {hop.peer} skipped: {peer} refused it ({e})")
                    return None
                self.sequence.ban(peer, e)
        return None

    def _tolerance(self, a: PeerID, b: PeerID) -> float:
        servers, wire = self.sequence.servers, self.sequence.config.wire
        limit = tolerance(*(servers[peer].to_wire() if peer in servers else {} for peer in (a, b)))
        return limit + WIRE_TOLERANCE.get(wire, 0.0)


def _kind(info) -> tuple[str, str] | None:
    return None if info is None else (info.dtype, info.quant)
