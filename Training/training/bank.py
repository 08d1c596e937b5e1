"""ProLearn's prototype bank during training: k-means over joint image+text vectors of the samples with reports
(on rank 0, shared with the others), and the image keys following the encoder after every epoch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from languageguidedseg.network import LanguageGuidedSegNet
from languageguidedseg.prototypes import build_bank, refresh_keys

from .data import Preloaded, Reports
from .runtime import Runtime


@torch.no_grad()
def image_embeddings(network: LanguageGuidedSegNet, data: Preloaded, indices: list[int], runtime: Runtime,
                     batch_size: int = 64) -> torch.Tensor:
    """Eval-mode bank query vectors of some preloaded samples."""
    network.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        batch = data.images[indices[start:start + batch_size]].float().to(runtime.device,
                                                                          memory_format=torch.channels_last)
        with runtime.autocast():
            out.append(network.image_embedding(network.encoder(batch)[-1]).float().cpu())
    network.train()
    return torch.cat(out) if out else torch.zeros(0, network.config.text_dim)


@dataclass
class BankMembers:
    """Which training samples each prototype was clustered from, the one whose report it shows, and that report."""

    members: list[list[int]] = field(default_factory=list)
    representatives: list[int] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)


def fill_bank(network: LanguageGuidedSegNet, data: Preloaded, reports: Reports, clusters_per_class: int, seed: int,
              runtime: Runtime) -> BankMembers:
    """Cluster the samples with reports into the network's bank (per pseudo-label class where there is a parser).

    The bank's text values become a new parameter: the caller puts it in the optimiser.
    """
    with_report = [i for i, r in enumerate(data.report_index.tolist()) if r >= 0]
    payload: list = [None] * 5
    if runtime.main:
        image = image_embeddings(network, data, with_report, runtime)
        rows = data.report_index[with_report]
        text = reports.pooled[rows]
        classes = None
        if reports.labels.shape[1]:
            labels = reports.labels[rows]
            classes = [torch.nonzero(labels[:, c]).flatten().tolist() for c in range(labels.shape[1])]
        content = build_bank(image, text, classes, clusters_per_class, seed)
        payload = [content.image_keys, content.text_values, content.classes,
                   [[with_report[i] for i in m] for m in content.members],
                   [with_report[i] for i in content.representatives]]
    keys, values, classes, members, representatives = runtime.broadcast(payload)
    network.bank.fill(keys, values, classes)
    network.config.bank_size = network.bank.size
    text_of = {row: report for report, row in reports.index.items()}
    return BankMembers(members, representatives, [text_of[int(data.report_index[i])] for i in representatives])


def join_bank(network: LanguageGuidedSegNet, data: Preloaded, reports: list[str], runtime: Runtime) -> BankMembers:
    """Members for a bank that came with the network (``init_from``): each training sample with a report joins the
    prototype with the nearest image key, so that the keys follow the encoder as in a run that clustered its own
    bank; the prototypes keep their ``reports``."""
    members: list = [None]
    if runtime.main:
        with_report = [i for i, r in enumerate(data.report_index.tolist()) if r >= 0]
        nearest = network.bank.query(image_embeddings(network, data, with_report, runtime), top_k=1).indices[:, 0]
        members = [[[s for s, p in zip(with_report, nearest.tolist()) if p == k] for k in range(network.bank.size)]]
    return BankMembers(runtime.broadcast(members)[0], [], list(reports))


def refresh_bank_keys(network: LanguageGuidedSegNet, data: Preloaded, bank: BankMembers, runtime: Runtime) -> None:
    """Recompute each prototype's image key from its members with the current encoder (on rank 0, shared)."""
    if not bank.members:
        return
    if runtime.main:
        used = sorted({i for m in bank.members for i in m})
        position = {i: j for j, i in enumerate(used)}
        embeddings = image_embeddings(network, data, used, runtime)
        refresh_keys(network.bank, embeddings, [[position[i] for i in m] for m in bank.members])
    runtime.broadcast_tensor(network.bank.image_keys)
