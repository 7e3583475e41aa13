"""DLM123: a Gaussian-mixture VAE with a convolutional encoder and decoder.

A caption x = (x_1 .. x_100) (characters, then PAD; see data.py) has one latent vector per slot,
z = (z_1 .. z_100), z_t in R^E, and every one of them is scored by the prior:

    p(z_t)   = (1/K) sum_k N(z_t; m_k, diag(s^2))          (means m_k and scale s shared by all slots)
    p(x | z) = prod_t softmax_c( <h_t, e_c> )[x_t],        h = (tanh, then conv5) applied D times to z
    q(z | x) = prod_t N(z_t; mu_t, diag(sigma^2)),         mu = (u + conv5(u)) applied D times to u = e[x]
    sigma    = sigma_max * sigmoid(rho): rho one learned vector (or predicted per slot, --posterior-scale slot)

e is the token embedding, tied between encoder input and decoder output. Two upper bounds on -log p(x):

    -ELBO = -E_q[ log p(x|z) + log p(z) ] - H[q]                      (H[q] in closed form)
    -IW_M = -log (1/M) sum_m p(x, z_m) / q(z_m | x),   z_m ~ q(z|x)    (-ELBO >= -IW_M >= -log p(x))

Training maximises the ELBO with --samples draws of z = mu + sigma * eps (reparameterised), or with
--estimator reinforce (the score-function gradient with a leave-one-out baseline; z is not differentiated).
NLPPS is -IW_64 (the tighter bound), averaged over the test captions; -ELBO is logged next to it.
README rows:  python dlm123_gmmvae.py   (20 epochs)   and   python dlm123_gmmvae.py --epochs 40 --run-name e40
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError, arg

SCRIPT = "dlm123_gmmvae"
EVAL_SEED = 1234  # every bound is computed with the same posterior draws at every evaluation


@dataclass
class Config:
    # model
    embed: int = arg(32, "latent, embedding and conv width E", low=1)
    components: int = arg(30, "Gaussian components K of the prior", low=1)
    depth: int = arg(3, "conv layers D of the encoder and of the decoder (width 5)", low=1)
    sigma_max: float = arg(2.5, "cap on the posterior scale", low=0, low_open=True)
    posterior_scale: str = arg("dim", "posterior scale: one learned per dimension, or predicted per slot", choices=("dim", "slot"))
    # objective
    samples: int = arg(5, "posterior samples per caption in the training ELBO", low=1)
    estimator: str = arg("reparam", "gradient of the ELBO: reparameterised, or REINFORCE with a leave-one-out baseline", choices=("reparam", "reinforce"))
    iw_samples: int = arg(64, "posterior samples per caption in the evaluation bounds", low=1)
    # optimisation
    epochs: int = arg(20, "training epochs", low=1)
    batch_size: int = arg(100, "captions per step", low=1)
    lr: float = arg(2e-3, "peak learning rate", low=0, low_open=True)
    lr_schedule: str = arg("cosine", "cosine decays the lr to 10%% of its peak over training", choices=("cosine", "constant"))
    optimizer: str = arg("adamw", "adamw, or rmsprop with eps 0.01 as the original research code", choices=("adamw", "rmsprop"))
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = arg(0, "seed of the initialisation and of the data order")
    # run control
    device: str = arg("auto", "where to run", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = arg("float32", "compute dtype (bfloat16 autocasts on CUDA)", choices=("float32", "bfloat16"))
    compile: bool = arg(False, "torch.compile the model")
    data_dir: str = arg("", "folder with the Multi30k .gz files (else $DLM_DATA_DIR, else download)")
    out_dir: str = arg("out", "runs are written to OUT_DIR/dlm123_gmmvae/RUN_NAME")
    run_name: str = arg("default", "name of the run folder")
    resume: bool = arg(False, "continue from the run folder's ckpt_last.pt")
    eval_only: bool = arg(False, "evaluate the run folder's ckpt_best.pt on val and test, then stop")
    sample_only: bool = arg(False, "print samples from the run folder's ckpt_best.pt, then stop")
    num_samples: int = arg(8, "samples printed and saved at each evaluation", low=0)
    temperature: float = arg(1.0, "sampling temperature", low=0, low_open=True)
    log_every: int = arg(50, "steps between train log lines", low=1)
    max_steps: int = arg(0, "stop after this many steps in total (0: no limit)", low=0)
    limit_train: int = arg(0, "train on the first N captions only (0: all), for quick tests", low=0)
    eval_batch_size: int = arg(100, "captions per evaluation batch", low=1)


# Flags that steer this run only; --resume takes every other setting from the checkpoint.
RUN_FLAGS = {"epochs", "device", "dtype", "compile", "data_dir", "out_dir", "run_name", "resume", "eval_only",
             "sample_only", "num_samples", "temperature", "log_every", "max_steps", "eval_batch_size", "iw_samples"}


# ----------------------------------------------------------------------------- model
def conv5(width):
    return nn.Conv1d(width, width, kernel_size=5, padding=2)  # zero 'same' padding: slot t sees t-2 .. t+2


class Model(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        E, K, D = cfg.embed, cfg.components, cfg.depth
        self.embed = nn.Embedding(vocab_size, E)  # N(0, 1); also the output matrix (tied)
        self.enc_convs = nn.ModuleList(conv5(E) for _ in range(D))
        self.dec_convs = nn.ModuleList(conv5(E) for _ in range(D))
        # sigma = sigma_max * sigmoid(rho) caps the scale smoothly: a clamp would freeze a scale that hits the
        # cap (the original's sigma ran away to it).
        self.log_sigma_max = math.log(cfg.sigma_max)
        rho_0 = -math.log(max(cfg.sigma_max - 1, 1.0))  # sigma starts at 1 (at sigma_max / 2 if the cap is < 2)
        if cfg.posterior_scale == "dim":
            self.scale = nn.Parameter(torch.full((E,), rho_0))
        else:
            self.scale = nn.Linear(E, E)
            nn.init.zeros_(self.scale.weight)
            nn.init.constant_(self.scale.bias, rho_0)
        self.prior_means = nn.Parameter(torch.randn(K, E))
        self.prior_log_std = nn.Parameter(torch.zeros(E))

    def encode(self, x):
        """x (B, L) ids -> posterior mean (B, L, E) and log sigma, (E,) or (B, L, E)."""
        u = self.embed(x).transpose(1, 2)  # (B, E, L): the conv layout
        for conv in self.enc_convs:
            u = u + conv(u)
        mean = u.transpose(1, 2)  # (B, L, E)
        rho = self.scale if isinstance(self.scale, nn.Parameter) else self.scale(mean)
        return mean, self.log_sigma_max + F.logsigmoid(rho)

    def draw(self, mean, log_sigma, n, generator=None):
        """n posterior samples z = mu + sigma * eps, (n, B, L, E). The noise is drawn on the CPU (the global RNG
        unless a generator is given), so a checkpoint's torch_rng replays it on any device."""
        eps = torch.randn((n, *mean.shape), generator=generator).to(mean.device)
        return mean + log_sigma.exp() * eps

    def entropy(self, mean, log_sigma):
        """(B,) H[q(z|x)], all slots."""
        return common.gaussian_entropy(log_sigma.expand_as(mean)).sum(-1)

    def decoder_log_probs(self, z):
        """z (..., L, E) -> (..., L, V) log p(x_t = c | z)."""
        h = z.flatten(0, -3).transpose(1, 2)  # (N, E, L)
        for conv in self.dec_convs:
            h = conv(torch.tanh(h))
        logits = h.transpose(1, 2) @ self.embed.weight.t()  # (N, L, V)
        return F.log_softmax(logits, dim=-1).view(*z.shape[:-1], -1)

    def log_joint(self, x, z):
        """x (B, L), z (S, B, L, E) -> log p(x | z) and log p(z), each (S, B): summed over all slots."""
        log_px_z = self.decoder_log_probs(z).gather(-1, x.expand(len(z), -1, -1).unsqueeze(-1)).squeeze(-1)
        log_pz = common.mixture_log_prob(z, self.prior_means, self.prior_log_std)  # (S, B, L)
        return log_px_z.sum(-1), log_pz.sum(-1)

    def loss(self, x, samples, estimator="reparam", generator=None):
        """x (B, L) -> (B,) -ELBO from `samples` posterior draws; its gradient is the chosen estimator's."""
        mean, log_sigma = self.encode(x)
        z = self.draw(mean, log_sigma, samples, generator)  # (S, B, L, E)
        entropy = self.entropy(mean, log_sigma)
        if estimator == "reparam":
            return -sum(self.log_joint(x, z)).mean(0) - entropy
        # Score function: no gradient flows through z; the encoder learns from (reward - baseline) * grad log q.
        z = z.detach()
        reward = sum(self.log_joint(x, z))  # (S, B)
        log_q = common.gaussian_log_prob(z, mean, log_sigma).sum(-1)  # (S, B)
        surrogate = common.reinforce_surrogate(log_q, reward)
        return -(reward.mean(0) + surrogate - surrogate.detach()) - entropy  # the value stays the -ELBO


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device):
    """Per caption of a split, in file order, from cfg.iw_samples posterior draws of a fixed seed: the -ELBO,
    the -IW bound, KL(q || p) and the posterior means (N, L, E)."""
    model.eval()
    generator = torch.Generator().manual_seed(EVAL_SEED)
    out = {"neg_elbo": [], "neg_iw": [], "kl": [], "means": []}
    for batch in data.batches(x, cfg.eval_batch_size):
        batch = batch.to(device)
        mean, log_sigma = model.encode(batch)
        terms = []  # one draw at a time: memory stays at one (B, L, V) decoder output
        for _ in range(cfg.iw_samples):
            z = model.draw(mean, log_sigma, 1, generator)
            log_q = common.gaussian_log_prob(z, mean, log_sigma).sum(-1)
            terms.append(torch.stack([*model.log_joint(batch, z), log_q]))  # (3, 1, B)
        log_px_z, log_pz, log_q = torch.cat(terms, dim=1)  # each (M, B)
        entropy = model.entropy(mean, log_sigma)
        out["neg_iw"].append(-common.logmeanexp(log_px_z + log_pz - log_q, dim=0))
        out["neg_elbo"].append(-(log_px_z + log_pz).mean(0) - entropy)
        out["kl"].append(-log_pz.mean(0) - entropy)
        out["means"].append(mean)
    model.train()
    return {k: torch.cat(v).float().cpu() for k, v in out.items()}


def active_dims(model, means):
    """Dimensions whose posterior mean moves with the caption: the variance over captions of mu_{t,d}, averaged
    over slots, above 1% of the prior's variance in that dimension (Burda et al. 2016's test, made scale-free)."""
    prior_var = model.prior_log_std.detach().exp().pow(2) + model.prior_means.detach().var(0)
    return int((means.var(0).mean(0) > 0.01 * prior_var.float().cpu()).sum())


def gradient_variance(model, x, cfg, repeats=8):
    """Trace of the covariance, over `repeats` draws, of the gradient of the batch -ELBO with respect to the
    encoder's own weights (its convs and scale), for each estimator: how noisy a training step would be."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    encoder = [p for name, p in model.named_parameters() if name.startswith(("enc_convs", "scale"))]
    variance = {}
    for estimator in ("reparam", "reinforce"):
        grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
            model.loss(x, max(cfg.samples, 2), estimator, generator).mean(), encoder)]) for _ in range(repeats)]
        variance[estimator] = torch.stack(grads).var(0).sum().item()
    return variance


@torch.no_grad()
def sample(model, n, temperature, device, generator):
    """Ancestral sampling: at every slot a component k ~ uniform and z_t ~ N(m_k, s^2); then every x_t from
    p(x_t | z) independently. The caption is read up to its first PAD."""
    model.eval()
    K, E = model.prior_means.shape
    k = torch.randint(K, (n, data.SLOTS), generator=generator).to(device)
    eps = torch.randn((n, data.SLOTS, E), generator=generator).to(device)
    z = model.prior_means[k] + model.prior_log_std.exp() * eps  # (n, L, E)
    probs = torch.softmax(model.decoder_log_probs(z) / temperature, dim=-1)
    x = torch.multinomial(probs.flatten(0, 1).cpu(), 1, generator=generator).view(n, data.SLOTS)
    model.train()
    return x


@torch.no_grad()
def reconstruct(model, x):
    """The most likely caption given the posterior mean: argmax_c p(x_t = c | z = mu(x)) at every slot."""
    model.eval()
    x = model.decoder_log_probs(model.encode(x)[0]).argmax(dim=-1)
    model.train()
    return x


def plot_latents(run_dir, means, x, vocab, title):
    """latents.png: the posterior means of three captions (dimension x slot), and a 2-D PCA projection of the
    means at the character slots (and closing PAD) of up to 300 captions, coloured by the character there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, mean, ids in zip(axes[:3], means, x):
        n = data.num_chars(ids[None]).item() + 1  # its characters and the closing PAD
        limit = mean[:n].abs().max().item()
        ax.imshow(mean[:n].t().numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_xticks(range(n), list(vocab.decode(ids)) + ["<pad>"], fontsize=5)
        ax.set(ylabel="latent dimension", title=vocab.decode(ids)[:50])
    x, means = x[:300], means[:300]
    keep = torch.arange(data.SLOTS) <= data.num_chars(x).unsqueeze(1)  # (N, L)
    points = means[keep] - means[keep].mean(0)
    xy = points @ torch.linalg.svd(points, full_matrices=False).Vh[:2].t()  # (P, 2)
    chars = ["" if i == data.PAD else "?" if i < len(data.SPECIALS) else vocab.itos[i] for i in x[keep].tolist()]
    kinds = {"lower case": str.islower, "upper case": str.isupper, "space": " ".__eq__, "<pad> (end)": "".__eq__}
    kinds["other"] = lambda c: not any(test(c) for test in list(kinds.values())[:4])
    for (label, test), color in zip(kinds.items(), ["tab:blue", "tab:green", "red", "black", "tab:orange"]):
        hit = torch.tensor([test(c) for c in chars])
        axes[3].scatter(*xy[hit].t().numpy(), s=2, alpha=0.4, color=color, label=label)
    axes[3].set(title="posterior means, PCA", xlabel="PC 1", ylabel="PC 2")
    axes[3].legend(markerscale=5, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "latents.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def report(run_dir, text):
    print(text, flush=True)
    with open(run_dir / "log.txt", "a") as f:
        f.write(text + "\n")


def write_samples(model, cfg, vocab, splits, device, run_dir, epoch):
    if cfg.num_samples == 0:
        return
    generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
    targets = splits["val"][: min(cfg.num_samples, 2)]
    lines = [f"[{tag}] {vocab.decode(ids)}" for ids, rec in zip(targets, reconstruct(model, targets.to(device)))
             for tag, ids in (("TARGET", ids), ("RECONS", rec))]
    lines += [f"[RANDOM] {vocab.decode(s)}" for s in sample(model, cfg.num_samples, cfg.temperature, device, generator)]
    with open(run_dir / "samples.txt", "a") as f:
        f.write(f"# epoch {epoch}, temperature {cfg.temperature}\n" + "".join(t + "\n" for t in lines))
    for t in lines:
        report(run_dir, t)


def eval_split(model, splits, split, cfg, vocab, device, run_dir, step, epoch):
    result = evaluate(model, splits[split], cfg, device)
    nlpps, elbo, kl = (result[k].mean().item() for k in ("neg_iw", "neg_elbo", "kl"))
    mean_chars = data.num_chars(splits[split]).float().mean().item()
    bpc, elbo_bpc = common.bits_per_char(nlpps, mean_chars), common.bits_per_char(elbo, mean_chars)
    active, bound = active_dims(model, result["means"]), f"iw-{cfg.iw_samples}"
    report(run_dir, f"eval {split} | epoch {epoch:.2f} | step {step} | nlpps {nlpps:.2f} | bpc {bpc:.4f} ({bound}) | "
                    f"-elbo {elbo:.2f} (bpc {elbo_bpc:.4f}) | kl {kl:.2f} | active dims {active}/{cfg.embed}")
    record = dict(kind=split, step=step, epoch=epoch, nlpps=nlpps, bpc=bpc, bound=bound, elbo=elbo,
                  elbo_bpc=elbo_bpc, kl=kl, active_dims=active)
    if split == "val":  # why reparameterisation wins: the same gradient, far less noise
        grad_var = gradient_variance(model, splits[split][: cfg.batch_size].to(device), cfg)
        report(run_dir, f"grad var (encoder, 8 draws) | reparam {grad_var['reparam']:.3e} | "
                        f"reinforce {grad_var['reinforce']:.3e}")
        record.update(grad_var_reparam=grad_var["reparam"], grad_var_reinforce=grad_var["reinforce"])
        plot_latents(run_dir, result["means"], splits[split], vocab, f"{SCRIPT}: epoch {epoch:.2f}")
    common.log_metrics(run_dir, record)
    if split == "test":  # per caption, file order: compare.py lines models up caption by caption
        (run_dir / "test_nlpps.txt").write_text("".join(f"{v:.4f}\n" for v in result["neg_iw"].tolist()))
    return result["neg_iw"]


def make_checkpoint(model, optimizer, cfg, vocab, step, epoch_rng, best_val):
    return dict(script=SCRIPT, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                args=dataclasses.asdict(cfg), vocab=vocab.itos, epoch_rng=epoch_rng,
                torch_rng=torch.get_rng_state(), best_val=best_val)


def run(argv=None):
    cfg, given = common.parse_config(Config, __doc__, argv)
    run_dir = Path(cfg.out_dir) / SCRIPT / cfg.run_name
    ckpt = None
    if cfg.resume or cfg.eval_only or cfg.sample_only:
        ckpt = common.load_checkpoint(run_dir / ("ckpt_last.pt" if cfg.resume else "ckpt_best.pt"), SCRIPT)
        kept = {k: v for k, v in ckpt["args"].items() if k not in RUN_FLAGS and k not in given}
        cfg = dataclasses.replace(cfg, **kept)
    if cfg.estimator == "reinforce" and cfg.samples < 2:
        raise UserError("--estimator reinforce needs --samples >= 2 (its baseline leaves one sample out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    vocab, splits = data.load(cfg.data_dir or None)
    if ckpt is not None and ckpt["vocab"] != vocab.itos:
        raise UserError("the checkpoint's vocabulary differs from this data's: wrong --data-dir?")
    train = splits["train"][: cfg.limit_train or None]
    model = Model(len(vocab), cfg).to(device)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
                 if cfg.optimizer == "adamw" else torch.optim.RMSprop(model.parameters(), lr=cfg.lr, eps=0.01))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    step, best_val = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        generator.set_state(ckpt["epoch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    forward = torch.compile(model.loss) if cfg.compile else model.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    n_params = sum(p.numel() for p in model.parameters())

    if cfg.sample_only:
        write_samples(model, cfg, vocab, splits, device, run_dir, epoch=step // steps_per_epoch)
        return
    if cfg.eval_only:
        for split in ("val", "test"):
            eval_split(model, splits, split, cfg, vocab, device, run_dir, step, step / steps_per_epoch)
        return
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    report(run_dir, f"{SCRIPT} | {n_params:,} parameters | {len(train):,} training captions | {device} | "
                    f"{steps_per_epoch} steps/epoch | run folder {run_dir}")

    def lr_at(step):
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))

    ckpt_last, ckpt_best = run_dir / "ckpt_last.pt", run_dir / "ckpt_best.pt"
    while step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
        epoch = step // steps_per_epoch
        epoch_rng = generator.get_state()  # saved so a resumed run replays this epoch's order
        t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
        for x in data.batches(train, cfg.batch_size, generator, skip=step - epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast:
                loss = forward(x.to(device), cfg.samples, cfg.estimator).mean()
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss at step {step}: stopped; the last good checkpoint "
                                f"{ckpt_last if ckpt_last.exists() else '(none yet)'} is kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen, loss_sum, loss_n = seen + len(x), loss_sum + loss.item(), loss_n + 1
            if step % cfg.log_every == 0:
                rate = seen / (time.time() - t0)
                report(run_dir, f"step {step} | epoch {step / steps_per_epoch:.2f} | train nlpps "
                                f"{loss_sum / loss_n:.2f} | {rate:.0f} seq/s | lr {lr_at(step):.2e}")
                common.log_metrics(run_dir, dict(kind="train", step=step, epoch=step / steps_per_epoch,
                                                 nlpps=loss_sum / loss_n, seq_per_s=rate, bound="elbo"))
                t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
            if step == total_steps or (cfg.max_steps and step >= cfg.max_steps):
                break
        epoch_done = step % steps_per_epoch == 0
        val = eval_split(model, splits, "val", cfg, vocab, device, run_dir, step, step / steps_per_epoch).mean().item()
        best_val = min(best_val, val)
        state = make_checkpoint(model, optimizer, cfg, vocab, step,
                                generator.get_state() if epoch_done else epoch_rng, best_val)
        common.save_checkpoint(state, ckpt_last)
        if val <= best_val:
            common.save_checkpoint(state, ckpt_best)
        write_samples(model, cfg, vocab, splits, device, run_dir, epoch=step // steps_per_epoch)
        common.plot_curves(run_dir, f"{SCRIPT} ({cfg.run_name})")

    best = common.load_checkpoint(ckpt_best, SCRIPT)
    model.load_state_dict(best["model"])
    eval_split(model, splits, "test", cfg, vocab, device, run_dir, best["step"], best["step"] / steps_per_epoch)


def main(argv=None):
    try:
        run(argv)
    except UserError as e:
        sys.exit(f"{SCRIPT}: error: {e}")


if __name__ == "__main__":
    main()
