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

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg

SCRIPT = "dlm123_gmmvae"


@dataclass
class Config(common.BaseConfig):
    embed: int = arg(32, "latent, embedding and conv width E", low=1)
    components: int = arg(30, "Gaussian components K of the prior", low=1)
    depth: int = arg(3, "conv layers D of the encoder and of the decoder (width 5)", low=1)
    sigma_max: float = arg(2.5, "cap on the posterior scale", low=0, low_open=True)
    posterior_scale: str = arg("dim", "posterior scale: one learned per dimension, or predicted per slot", choices=("dim", "slot"))
    train_samples: int = arg(5, "posterior draws per caption in the training ELBO", low=1)
    estimator: str = arg("reparam", "gradient of the ELBO: reparameterised, or REINFORCE with a leave-one-out baseline", choices=("reparam", "reinforce"))
    iw_samples: int = arg(64, "posterior draws per caption in the evaluation bounds", low=1)
    eval_batch_size: int = arg(100, "captions per evaluation batch", low=1, run=True)


CURVES_SIDE = None  # curves.png shows NLPPS only


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
            self.rho = nn.Parameter(torch.full((E,), rho_0))
        else:
            self.rho = nn.Linear(E, E)
            nn.init.zeros_(self.rho.weight)
            nn.init.constant_(self.rho.bias, rho_0)
        self.train_samples, self.estimator = cfg.train_samples, cfg.estimator
        self.prior_means = nn.Parameter(torch.randn(K, E))
        self.prior_log_std = nn.Parameter(torch.zeros(E))

    def encode(self, x):
        """x (B, L) ids -> posterior mean (B, L, E) and log sigma, (E,) or (B, L, E)."""
        u = self.embed(x).transpose(1, 2)  # (B, E, L): the conv layout
        for conv in self.enc_convs:
            u = u + conv(u)
        mean = u.transpose(1, 2)  # (B, L, E)
        rho = self.rho if isinstance(self.rho, nn.Parameter) else self.rho(mean)
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

    def loss(self, x):
        """x (B, L) -> (B,) the training loss: -ELBO from train_samples draws, with the estimator's gradient."""
        return self.neg_elbo(x, self.train_samples, self.estimator)

    def neg_elbo(self, x, samples, estimator="reparam", generator=None):
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
def build_model(vocab, train, cfg):
    if cfg.estimator == "reinforce" and cfg.train_samples < 2:
        raise common.UserError("--estimator reinforce needs --train-samples >= 2 (its baseline leaves one draw out)")
    return Model(len(vocab), cfg)


@torch.no_grad()
def evaluate(model, x, cfg, device, final=True):
    """Per caption of a split, in file order, from cfg.iw_samples posterior draws of the evaluation generator:
    nll = the -IW bound; extra: -ELBO, KL(q || p), active dimensions; detail: the posterior means (N, L, E)."""
    model.eval()
    generator = common.eval_generator()
    out = {"neg_elbo": [], "neg_iw": [], "kl": [], "means": []}
    n_batches = math.ceil(len(x) / cfg.eval_batch_size)
    for batch in common.progress(data.batches(x, cfg.eval_batch_size), n_batches, "evaluating"):
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
    out = {k: torch.cat(v).float().cpu() for k, v in out.items()}
    extra = dict(neg_elbo=out["neg_elbo"].mean().item(), kl=out["kl"].mean().item(),
                 active_dims=active_dims(model, out["means"]))
    return common.Evaluation(out["neg_iw"], f"-iw{cfg.iw_samples} bound", extra, detail=dict(means=out["means"]))


def active_dims(model, means):
    """Dimensions whose posterior mean moves with the caption: the variance over captions of mu_{t,d}, averaged
    over slots, above 1% of the prior's variance in that dimension (Burda et al. 2016's test, made scale-free)."""
    prior_var = model.prior_log_std.detach().exp().pow(2) + model.prior_means.detach().var(0)
    return int((means.var(0).mean(0) > 0.01 * prior_var.float().cpu()).sum())


def gradient_variance(model, x, cfg, repeats=8):
    """Trace of the covariance, over `repeats` draws, of the gradient of the batch -ELBO with respect to the
    encoder's own weights (its convs and scale), for each estimator: how noisy a training step would be."""
    generator = common.eval_generator()
    encoder = [p for name, p in model.named_parameters() if name.startswith(("enc_convs", "rho"))]
    variance = {}
    for estimator in ("reparam", "reinforce"):
        grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
            model.neg_elbo(x, max(cfg.train_samples, 2), estimator, generator).mean(), encoder)]) for _ in range(repeats)]
        variance[estimator] = torch.stack(grads).var(0).sum().item()
    return variance


@torch.no_grad()
def sample(model, n, temperature, device, generator):
    """Ancestral sampling: at every slot a component k ~ uniform and z_t ~ N(m_k, s^2); then every x_t from
    p(x_t | z, x_t != BOS) independently. The caption is read up to its first PAD."""
    model.eval()
    K, E = model.prior_means.shape
    k = torch.randint(K, (n, data.SLOTS), generator=generator).to(device)
    eps = torch.randn((n, data.SLOTS, E), generator=generator).to(device)
    z = model.prior_means[k] + model.prior_log_std.exp() * eps  # (n, L, E)
    probs = torch.softmax(data.emittable(model.decoder_log_probs(z)) / temperature, dim=-1)
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


def eval_split(model, vocab, splits, split, cfg, device, run, step, epoch):
    t0 = time.time()
    ev = evaluate(model, splits[split], cfg, device, final=split == "test")
    if split == "val":  # why reparameterisation wins: the same gradient, far less noise
        grad_var = gradient_variance(model, splits[split][: cfg.batch_size].to(device), cfg)
        ev.extra.update(grad_var_reparam=grad_var["reparam"], grad_var_reinforce=grad_var["reinforce"])
        plot_latents(run.dir, ev.detail["means"], splits[split], vocab, f"{SCRIPT}: epoch {epoch:.2f}")
    run.report_eval(split, ev, splits[split], step, epoch, time.time() - t0)
    return ev


def write_samples(model, vocab, splits, cfg, device, run, epoch):
    if cfg.show_samples:
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
        targets = splits["val"][: min(cfg.show_samples, 2)]
        lines = [f"[{tag}] {vocab.decode(ids)}" for ids, rec in zip(targets, reconstruct(model, targets.to(device)))
                 for tag, ids in (("TARGET", ids), ("RECONS", rec))]
        run.write_samples(lines + [f"[RANDOM] {vocab.decode(s)}" for s in
                                   sample(model, cfg.show_samples, cfg.temperature, device, generator)], epoch)


# ============================================================================= the loop
# From this line to the end of the file the text is the same in every script of the family (a test checks
# it): the model above provides build_model, Model.loss, eval_split, write_samples and CURVES_SIDE.
def run(argv=None):
    cfg, run = common.open_run(Config, SCRIPT, __doc__, argv)  # flags, the run folder (locked), its checkpoint
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vocab, splits = data.load(cfg.data_dir or None, cfg.custom_data, getattr(cfg, "no_spaces", False))
    train = splits["train"][: cfg.limit_train or None]
    model = build_model(vocab, train, cfg).to(device)
    optimizer = common.make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    step, best_val = run.restore(model, optimizer, generator, vocab)
    forward = torch.compile(model.loss) if cfg.compile else model.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    if cfg.sample_only:
        return write_samples(model, vocab, splits, cfg, device, run, step // steps_per_epoch)
    if cfg.eval_only:
        for split in ("val", "test"):
            eval_split(model, vocab, splits, split, cfg, device, run, step, step / steps_per_epoch)
        return
    run.start(model, train, device, steps_per_epoch, total_steps, step)
    while step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
        epoch = step // steps_per_epoch
        epoch_rng = generator.get_state()  # saved so a resumed run replays this epoch's order
        for x in data.batches(train, cfg.batch_size, generator, skip=step - epoch * steps_per_epoch):
            lr = common.set_lr(optimizer, cfg, step, total_steps)
            with autocast:
                loss = forward(x.to(device)).mean()
            if not torch.isfinite(loss):
                raise run.nan_stop(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            run.log_step(step, steps_per_epoch, len(x), loss.item(), lr)
            if run.interrupted and step % steps_per_epoch:  # Ctrl-C mid-epoch: keep this step, then stop
                run.save(model, optimizer, vocab, step, epoch_rng, best_val, is_best=False)
                raise run.interrupt_stop(step)
            if step == total_steps or (cfg.max_steps and step >= cfg.max_steps):
                break
        epoch_done = step % steps_per_epoch == 0
        val = eval_split(model, vocab, splits, "val", cfg, device, run, step, step / steps_per_epoch)
        is_best = val.nll.mean().item() <= best_val
        best_val = min(best_val, val.nll.mean().item())
        run.save(model, optimizer, vocab, step, generator.get_state() if epoch_done else epoch_rng, best_val, is_best)
        write_samples(model, vocab, splits, cfg, device, run, step // steps_per_epoch)
        run.plot_curves(CURVES_SIDE)
        if run.interrupted:  # Ctrl-C at the end of an epoch: it is evaluated and saved
            raise run.interrupt_stop(step)

    best_step = run.load_best(model)
    eval_split(model, vocab, splits, "test", cfg, device, run, best_step, best_step / steps_per_epoch)


def main(argv=None):
    common.main(SCRIPT, run, argv)


if __name__ == "__main__":
    main()
