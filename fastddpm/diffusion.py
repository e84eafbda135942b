"""DenoiseDiffusion: labml's API (``labml_nn.diffusion.ddpm.DenoiseDiffusion``) over the fused ops."""
import torch
from torch import nn

from . import _checks, _layout, backends, objectives, ops, samplers
from . import schedule as schedules

_REDUCTIONS = ("mean", "none")
# labml's attributes, kept as float32 buffers for code that reads them.
_LABML_BUFFERS = ("beta", "alpha", "alpha_bar", "sigma2")
_KERNEL_TABLES = ("sqrt_ab", "sqrt_1m_ab", "c1", "c2", "sigma")
_MODEL_OUT = "eps_model's output"
_WEIGHTINGS = (None, "min_snr")
LEARNED_VARIANCES = (None, "range", "log")
OBJECTIVES = (None, "simple", "hybrid", "kl")
_VLB_VAR = {"range": "learned_range", "log": "learned", None: "fixed"}


_default_offset = _checks.default_offset


def _check_device(device) -> torch.device:
    """``device`` as a torch.device the tables can live on (a clear error where torch's is not)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is not a CUDA build" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise RuntimeError(f"device is {device} but {why}; pass device='cpu' (or leave it None)")
    return device


class DenoiseDiffusion(nn.Module):
    """Denoising diffusion (Ho et al. 2020) with fused q_sample, p_sample and loss.

    ``DenoiseDiffusion(eps_model, n_steps, device)`` as in labml. ``schedule`` is "linear"
    (labml's), "cosine", "scaled_linear", "sigmoid" or a 1-D tensor of betas;
    ``zero_terminal_snr=True`` rescales it (:func:`fastddpm.schedule.rescale_finite_terminal_snr`:
    Lin et al.'s zero terminal SNR, except that the last alpha_bar is 2**-24, as diffusers' Euler
    schedulers set it, rather than 0; train it with ``prediction="v"`` or "x0"). ``prediction``
    is what ``eps_model`` outputs: "eps" (labml's), "x0" or "v" (Salimans & Ho 2022); ``loss``
    trains toward it and ``p_sample``, ``sampler()`` and ``sample()`` read it so. ``backend`` is
    "auto" or a name from :func:`fastddpm.available_backends`; a named backend that cannot run on the module's device
    is refused here (:class:`fastddpm.BackendUnavailableError`, saying why). ``beta``,
    ``alpha``, ``alpha_bar`` and ``sigma2`` are float32 buffers as in labml; the kernels read
    float32 tables (float64 ones for float64 data) computed once in float64, which follow the
    module across ``.to()`` and keep their dtype under ``.half()``. Data must be on the device
    of the tables. ``q_sample`` and ``p_sample`` return their input's memory format
    (channels_last stays channels_last), with the values of the contiguous input.

    ``learned_variance`` (improved DDPM, Nichol & Dhariwal 2021): None (the default: a fixed
    variance), "range" (ADM's learned_range: the model's variance channels v interpolate the log
    variance as frac log(beta_t) + (1 - frac) log(posterior variance_t), frac = (v + 1) / 2) or
    "log" (the channels are the log variance itself). The model then outputs 2C channels on dim
    1: the C mean channels (eps or x0 by ``prediction``; "v" is refused), then the C variance
    channels. ``loss`` then trains the hybrid objective by default, ``p_sample`` and the DDPM
    ``sample()`` sample with the learned variance, and :meth:`calc_bpd` evaluates bits per dim.
    """

    _fastddpm_diffusion = True  # what fastddpm.samplers checks for (it does not import this module)

    def __init__(self, eps_model: nn.Module, n_steps: int, device=None, *, schedule="linear",
                 backend="auto", prediction="eps", zero_terminal_snr=False, learned_variance=None):
        super().__init__()
        self.prediction = objectives.check_prediction(prediction)
        if learned_variance not in LEARNED_VARIANCES:
            raise ValueError(f"learned_variance must be one of {LEARNED_VARIANCES}, got {learned_variance!r}")
        if learned_variance is not None and self.prediction == "v":
            raise ValueError("learned_variance needs prediction='eps' or 'x0' (the variational bound of a v "
                             "prediction is not implemented), got prediction='v'")
        self.learned_variance = learned_variance
        betas = schedules.resolve(schedule, n_steps, zero_terminal_snr)
        if device is None:
            param = next(iter(eps_model.parameters()), None) if isinstance(eps_model, nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
        device = _check_device(device)
        if backend != "auto":
            backends.status(backend)  # an unknown name fails here
            # A named backend that is absent here or cannot take the device's tensors fails now,
            # with the registry's reason, not at the first call. A module built on meta holds no
            # data and is moved before use (to_empty): the first call there checks its backend.
            if device.type != "meta":
                backends.resolve(backend, device)
        self.eps_model = eps_model
        self.n_steps = betas.numel()
        self.backend = backend
        self._tables64 = schedules.coefficient_tables(betas)  # CPU float64 masters
        ab, omab = self._tables64["alpha_bar"], self._tables64["sqrt_1m_ab"] ** 2
        self._objective64 = dict(zip(("cx0", "ceps"), objectives.target_tables(self.prediction, ab, omab)))
        self._objective64.update(zip(("ex", "eout"), objectives.eps_tables(self.prediction, ab, omab)))
        schedules.check_finite(self._objective64, betas)
        self._weights64 = {}  # (weighting key) -> float64 per-t weights, made once
        # The variational bound's [n, 9] table and (learned variance) ADM's p_sample step tables.
        from .samplers.tables import adm as adm_tables
        # Made here only with a learned variance: a fixed-variance module builds them on the first
        # loss(objective="kl") (a schedule can train by the MSE whose posterior log variance is not
        # finite, e.g. a tiny first beta).
        self._vlb64 = {"vlb": adm_tables.vlb_table(betas, "large")} if learned_variance is not None else {}
        if learned_variance is not None:
            self._vlb64["p_coef"] = adm_tables.p_sample_coef(betas, "eps" if self.prediction == "eps" else "x0",
                                                             _VLB_VAR[learned_variance])
        self._bpd = None  # the fastddpm.adm diffusion calc_bpd runs, made on first use
        for name in _LABML_BUFFERS:
            self.register_buffer(name, self._tables64[name].to(device, torch.float32), persistent=False)
        self._build_kernel_tables()

    def _build_kernel_tables(self):
        """The kernel tables on the buffers' device (indexed: cuda:0, not cuda)."""
        self._device = device = self.beta.device
        masters = {**{k: self._tables64[k] for k in _KERNEL_TABLES}, **self._objective64, **self._vlb64}
        self._tables = {dt: {k: v.to(device, dt) for k, v in masters.items()} for dt in (torch.float32, torch.float64)}
        self._weights = {}  # (weighting key, dtype) -> the weights on the device
        self._coefs = {}  # (vb_weight, dtype) -> _hybrid_coef's tensor on the device
        # Resolve the backend for this device now, so a method's first call (eager or under
        # torch.compile) finds it in the registry's cache. An error is raised by that call.
        try:
            impl = backends.resolve(self.backend, device)
        except backends.BackendUnavailableError:
            impl = None
        # What loss(x0)'s common call looks up, found once: (the backend's name, {data dtype:
        # (backend module, tables, whether the noise is kept)}); None when the backend is
        # unavailable (the general path then raises its error).
        self._hot = None if impl is None else (self.backend, {
            dt: (impl, self._tables_for_dtype(dt), impl.materialises_noise(dt)) for dt in _checks.FLOATS})

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() convert the buffers; their values are then set again from the
        # float64 masters (so .to_empty() from meta gives the schedule, not garbage), and the
        # kernel tables are rebuilt there, never rounded by a .half() of the module.
        super()._apply(fn, *args, **kwargs)
        for name in _LABML_BUFFERS:
            buf = self._buffers[name]
            self._buffers[name] = self._tables64[name].to(buf.device, buf.dtype)
        self._build_kernel_tables()
        return self

    def _check_x(self, name, x, t):
        """The data's checks, made once by every method: a floating tensor with a batch
        dimension on the tables' device; ``t`` (unless None) checked against it."""
        _checks.check_float(name, x)
        if x.device != self._device:
            raise RuntimeError(f"{name} is on {x.device} but the DenoiseDiffusion's tables are on "
                               f"{self._device}; move one (e.g. diffusion.to({name}.device))")
        return None if t is None else _checks.check_t(t, x.shape[0], self._device, self.n_steps)

    def _checked(self, name, x, t, noise, sample_offset):
        """_check_x, then noise (cast to x's dtype) and the sample offset: (t, noise, offset)."""
        t = self._check_x(name, x, t)
        noise = _checks.check_like("noise", noise, name, x, optional=True)
        offset = _default_offset(x.shape[0]) if sample_offset is None else _checks.check_offset(sample_offset)
        return t, noise, offset

    def _eps(self, x_t, t, ref_name, ref, cast):
        """eps_model(x_t, t), checked once for p_sample and loss: a floating tensor of the data's
        shape and device (cast to its dtype when ``cast``)."""
        return _checks.check_like(_MODEL_OUT, self._model()(x_t, t), ref_name, ref, cast=cast)

    def _model(self):
        # A module is found in _modules directly, not through nn.Module.__getattr__ (a tenth of
        # the host work of a tiny training step); a plain function is an ordinary attribute.
        return self._modules.get("eps_model") or self.eps_model

    def _tables_for(self, x):
        return self._tables_for_dtype(x.dtype)

    def _tables_for_dtype(self, dtype):
        return self._tables[torch.float64 if dtype == torch.float64 else torch.float32]

    def q_xt_x0(self, x0: torch.Tensor, t):
        """Mean and variance of q(x_t | x_0), each shaped to broadcast against x0."""
        t = self._check_x("x0", x0, t)
        tables = self._tables_for(x0)
        sqrt_ab = schedules.gather(tables["sqrt_ab"], t, x0)
        var = schedules.gather(tables["sqrt_1m_ab"], t, x0) ** 2
        return (sqrt_ab * x0).to(x0.dtype), var

    def q_sample(self, x0: torch.Tensor, t, noise=None, *, eps=None, generator=None, sample_offset=None):
        """Sample x_t ~ q(x_t | x_0); ``eps=`` is labml's name for ``noise``."""
        if eps is not None:
            if noise is not None:
                raise TypeError("q_sample got both noise and eps; pass one")
            noise = eps
        t, noise, offset = self._checked("x0", x0, t, noise, sample_offset)
        impl = backends.resolve(self.backend, self._device)
        seed = None if noise is not None else _checks.draw_seed(self._device, generator)
        tables = self._tables_for(x0)
        x_t = ops.run_q_sample(impl, x0, t, tables["sqrt_ab"], tables["sqrt_1m_ab"], noise, seed, offset)
        return _layout.like(x_t, x0)  # x0's memory format (channels_last stays so)

    def p_sample(self, x_t: torch.Tensor = None, t=None, noise=None, *, xt=None, generator=None,
                 sample_offset=None):
        """Sample x_{t-1} ~ p_theta(x_{t-1} | x_t), noise added at every t as in labml.

        ``xt=`` is labml's name for ``x_t``.
        """
        if xt is not None:
            if x_t is not None:
                raise TypeError("p_sample got both x_t and xt; pass one")
            x_t = xt
        if x_t is None or t is None:
            raise TypeError(f"p_sample() is missing its argument {'x_t' if x_t is None else 't'}")
        t, noise, offset = self._checked("x_t", x_t, t, noise, sample_offset)
        impl = backends.resolve(self.backend, self._device)
        if self.learned_variance is not None:
            return self._p_sample_learned(impl, x_t, t, noise, generator, offset)
        eps_theta = self._eps(x_t, t, "x_t", x_t, cast=True)
        seed = None if noise is not None else _checks.draw_seed(self._device, generator)
        tables = self._tables_for(x_t)
        if self.prediction != "eps":  # the output as eps = ex[t] x_t + eout[t] out, one fused pass
            eps_theta = ops.run_q_sample(impl, x_t, t, tables["ex"], tables["eout"], eps_theta, None, 0)
        x_prev = ops.run_p_sample_step(impl, x_t, eps_theta, t, tables["c1"], tables["c2"], tables["sigma"], noise,
                                       seed, offset)
        return _layout.like(x_prev, x_t)  # x_t's memory format (channels_last stays so)

    def _model_out(self, x_t, t, ref, split=True):
        """eps_model(x_t, t) with a learned variance: 2C channels on dim 1, checked, as (out,
        mean part, variance part) in ref's dtype (the parts contiguous copies; None without
        ``split``, for the fused vlb_loss, which reads the 2C channels as they are)."""
        c = ref.shape[1] if ref.dim() >= 2 else "C"
        out = _checks.check_channels(_MODEL_OUT, self._model()(x_t, t), "the data", ref, 2,
                                     lambda: f"the {c} mean channels, then {c} variance channels, for "
                                             f"learned_variance={self.learned_variance!r}")
        out = out if out.dtype == ref.dtype else out.to(ref.dtype)
        if not split:
            return out, None, None
        return out, out[:, :c].contiguous(), out[:, c:].contiguous()

    def _p_sample_learned(self, impl, x_t, t, noise, generator, offset):
        """One fused step of ADM's p_sample (no clipping; no noise at t == 0, as ADM)."""
        _, mean_part, var = self._model_out(x_t, t, x_t)
        seed = None if noise is not None else _checks.draw_seed(self._device, generator)
        coef = self._tables_for(x_t)["p_coef"]
        y = ops.run_solver_step(impl, x_t, mean_part, None, (), t, coef, None, float("inf"), 1.0, noise, seed,
                                offset, var)
        return _layout.like(y[0], x_t)

    def loss(self, x0: torch.Tensor, noise=None, *, t=None, generator=None, reduction="mean",
             sample_offset=None, weighting=None, min_snr_gamma=5.0, objective=None, vb_weight=1.0):
        """Simplified loss: mean over samples of mean((target - eps_model(x_t, t))^2).

        The target is the class's ``prediction``: the noise (eps), x0, or v = sqrt(ab_t) noise -
        sqrt(1 - ab_t) x0. ``t`` defaults to one uniform step per sample from the contract's
        stream. With ``noise`` None the noise is the contract's: on a GPU it is generated
        in-kernel and regenerated for the MSE (the v target too is formed in-kernel, forward and
        backward), never stored; on the cpu backend (float32/float64 data) it is drawn once and
        kept for the backward, which is faster there (benchmarks/RESULTS.md, "Where the noise is
        generated on a CPU"). The values are the same either way.
        ``weighting``: None, "min_snr" (min-SNR-gamma, Hang et al. 2023, in the form for the
        prediction type, ``min_snr_gamma`` its gamma) or a 1-D tensor of n_steps weights >= 0;
        each sample's loss is multiplied by the weight of its t. ``reduction="none"`` returns
        the (weighted) per-sample loss, shape [B].

        ``objective`` (improved DDPM): None ("hybrid" with a learned variance, else "simple"),
        "simple" (the MSE above, of the mean channels only with a learned variance), "hybrid"
        (needs ``learned_variance``: MSE + ``vb_weight`` * vb, vb the variational bound's term of
        each sample's t in bits per dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the
        discretized decoder NLL at t == 0, with ADM's stop-gradient of the mean inside vb, so vb
        trains only the variance channels) or "kl" (vb alone, the mean not detached; with a fixed
        variance the model's log variance is log beta_t, as p_sample's). Both are one fused
        ``vlb_loss`` pass. ``vb_weight`` (float >= 0, default 1.0) weighs vb in "hybrid".
        """
        if (noise is None and t is None and weighting is None and objective is None and reduction == "mean"
                and sample_offset is None
                and (self.learned_variance is None or (type(vb_weight) is float and vb_weight == 1.0))):
            y = self._loss_of_x0(x0, generator)  # the common call, loss(x0): tested once
            if y is not None:
                return y
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        objective = self._check_objective(objective, vb_weight)
        weights_key = self._weights_key(weighting, min_snr_gamma)
        t, noise, offset = self._checked("x0", x0, t, noise, sample_offset)
        _checks.check_elements("x0", x0)
        impl = backends.resolve(self.backend, self._device)
        tables = self._tables_for(x0)
        x_t, t, noise, noise_seed = self._train_inputs(impl, x0, t, noise, generator, offset, tables)
        if objective == "simple" and self.learned_variance is None:
            out = self._eps(x_t, t, "x0", x0, cast=False)  # the MSE promotes the two dtypes
            if reduction == "mean" and self._fused_mean(out, x0, noise):
                # The weighted mean over samples in the MSE's own call: one autograd node.
                weight = None if weights_key is None else self._weights_on(weights_key, weighting, out.dtype)[t]
                return self._mse_loss(impl, out, x0, t, noise, noise_seed, offset, weight)
            per_sample = self._mse_to_target(impl, out, x0, t, noise, noise_seed, offset)
        elif objective == "simple":
            _, mean_part, _ = self._model_out(x_t, t, x0)
            per_sample = self._mse_to_target(impl, mean_part, x0, t, noise, noise_seed, offset)
        else:
            if self.learned_variance is None:
                out = self._eps(x_t, t, "x0", x0, cast=True)
            else:
                out, _, _ = self._model_out(x_t, t, x0, split=False)
            if "vlb" not in tables:  # the first KL loss of a fixed-variance module
                from .samplers.tables import adm as adm_tables
                self._vlb64["vlb"] = adm_tables.vlb_table(self._tables64["beta"], "large")
                self._build_kernel_tables()
                tables = self._tables_for(x0)
            terms = self._vlb_terms(impl, x0, out, t, tables, noise, noise_seed, offset, objective == "hybrid")
            per_sample = self._hybrid(terms, vb_weight) if objective == "hybrid" else terms[:, 1]
        if weights_key is not None:
            per_sample = per_sample * self._weights_on(weights_key, weighting, per_sample.dtype)[t]
        return per_sample if reduction == "none" else per_sample.mean()

    def _loss_of_x0(self, x0, generator):
        """loss(x0, generator=generator) with every other argument at its default (the hybrid
        loss with vb_weight 1 for a learned variance), or None where the general path must run.

        Where host work is the cost (a GPU at CIFAR size, a CPU at a tiny size) the general
        path's checks and lookups were 5 of a tiny training step's 17 us of forward host work
        (benchmarks/RESULTS.md). So a plain floating tensor on the module's device that needs no
        gradient, outside torch.compile, is tested once and finds its backend and tables in
        ``_hot``; anything else, and every error, takes the general path. Both make the same op
        calls."""
        hot = self._hot
        if torch.compiler.is_compiling() or type(x0) is not torch.Tensor or hot is None or hot[0] != self.backend:
            return None
        entry = hot[1].get(x0.dtype)
        if (entry is None or x0.device != self._device or x0.dim() == 0 or x0.numel() == 0
                or (x0.requires_grad and torch.is_grad_enabled())):
            return None
        impl, tables, keep = entry
        if generator is not None:
            _checks.check_generator(self._device, generator)
        offset = _checks.default_offset_of(x0)
        x_t, t, noise, seed = ops.run_train_inputs(impl, x0, tables["sqrt_ab"], tables["sqrt_1m_ab"], None, generator,
                                                   offset, keep)
        noise, seed = (noise, None) if keep else (None, seed)  # as _train_inputs returns them
        if self.learned_variance is not None:
            out, _, _ = self._model_out(x_t, t, x0, split=False)  # (checked, in x0's dtype)
            return self._hybrid(self._vlb_terms(impl, x0, out, t, tables, noise, seed, offset, True), 1.0).mean()
        out = self._model()(x_t, t)
        if type(out) is not torch.Tensor or out.dtype != x0.dtype or out.shape != x0.shape or out.device != x0.device:
            out = _checks.check_like(_MODEL_OUT, out, "x0", x0, cast=False)
            if not self._fused_mean(out, x0, noise):  # another dtype: the per-sample MSE promotes
                return self._mse_to_target(impl, out, x0, t, noise, seed, offset).mean()
        return self._mse_loss(impl, out, x0, t, noise, seed, offset, None)

    def _train_inputs(self, impl, x0, t, noise, generator, offset, tables):
        """(x_t, t, noise, noise_seed) of a training step: noise the tensor the loss reads (given,
        or drawn once and kept where the backend materialises it) or None, noise_seed the seed
        of the stream's noise where it is regenerated instead (else None).

        Drawing t and the noise, the common case, is one fused call (seed, t, noise and x_t);
        a given t or noise, or an x0 or table that requires grad, takes the separate ops."""
        sqrt_ab, sqrt_1m_ab = tables["sqrt_ab"], tables["sqrt_1m_ab"]
        keep = noise is None and impl.materialises_noise(x0.dtype)
        # (The tables are the module's own, made without grad.)
        if t is None and noise is None and not (x0.requires_grad and torch.is_grad_enabled()):
            if generator is not None:
                _checks.check_generator(self._device, generator)
            if torch.compiler.is_compiling():  # the seed an op of the graph: a generator is not traceable
                seed = _checks.draw_seed(self._device, generator)
                x_t, t, kept, _ = ops.run_train_inputs(impl, x0, sqrt_ab, sqrt_1m_ab, seed, None, offset, keep)
            else:
                x_t, t, kept, seed = ops.run_train_inputs(impl, x0, sqrt_ab, sqrt_1m_ab, None, generator, offset, keep)
            return (x_t, t, kept, None) if keep else (x_t, t, None, seed)
        # One seed serves the drawn t and the drawn noise; none is drawn when neither is.
        seed = _checks.draw_seed(self._device, generator) if noise is None or t is None else None
        if t is None:
            t = ops.run_sample_t(impl, seed, x0.shape[0], self.n_steps, offset)
        noise_seed = seed if noise is None else None
        if keep:
            # Where a normal costs more than a memory pass (the CPU), draw the contract's noise
            # once and hand it to q_sample and the MSE instead of generating it three times.
            noise, noise_seed = ops.run_normal(impl, seed, x0.shape, offset, x0.dtype), None
        x_t = ops.run_q_sample(impl, x0, t, sqrt_ab, sqrt_1m_ab, noise, noise_seed, offset)
        return x_t, t, noise, noise_seed

    def _fused_mean(self, out, x0, noise):
        """Whether the reduced MSE (one call, one node, d/dout only) can take this loss: one
        dtype, and no gradient wanted for the data or the noise."""
        return out.dtype == x0.dtype and not (torch.is_grad_enabled() and (
            x0.requires_grad or (noise is not None and noise.requires_grad)))

    def _mse_loss(self, impl, out, x0, t, noise, seed, offset, weight):
        """The (weighted) mean over samples of the MSE against the prediction type's target, one
        fused call: the noise (eps), x0, or v formed in the kernel (forward and backward)."""
        if self.prediction == "eps":
            return ops.run_mse_loss(impl, out, noise, seed, offset, weight)
        if self.prediction == "x0":
            return ops.run_mse_loss(impl, out, x0, None, 0, weight)
        tables = self._tables_for(out)
        return ops.run_mse_loss(impl, out, noise, seed, offset, weight, x0, t, tables["cx0"], tables["ceps"])

    def _mse_to_target(self, impl, out, x0, t, noise, seed, offset):
        """Per-sample MSE of the model output against the prediction type's target, one fused pass
        (the v target cx0[t] x0 + ceps[t] noise formed in the kernel)."""
        if self.prediction == "eps":
            if noise is None:
                # The stream's noise is regenerated in pred's dtype: make that the wider of the
                # output's and x0's, as a kept noise (x0's dtype) is promoted, so that a narrower
                # output (a bfloat16 model under autocast) is not compared with rounded noise.
                return ops.run_mse_per_sample(impl, out.to(torch.promote_types(out.dtype, x0.dtype)), None, seed,
                                              offset)
            pred, target = _checks.common_dtype(out, noise)
            return ops.run_mse_per_sample(impl, pred, target, seed, offset)
        if self.prediction == "x0":
            return objectives.promoted_mse(lambda p, x: ops.run_mse_per_sample(impl, p, x, None, 0), out, x0)
        tables = self._tables[torch.float64 if torch.float64 in (out.dtype, x0.dtype) else torch.float32]

        def v_mse(pred, x):
            z = None if noise is None else noise.to(pred.dtype)
            return ops.run_target_mse(impl, pred, x, t, tables["cx0"], tables["ceps"], z, seed, offset)

        return objectives.promoted_mse(v_mse, out, x0)

    def _check_objective(self, objective, vb_weight):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective is None:
            objective = "simple" if self.learned_variance is None else "hybrid"
        if objective == "hybrid" and self.learned_variance is None:
            raise ValueError("objective='hybrid' needs a learned variance (DenoiseDiffusion(..., "
                             "learned_variance='range' or 'log')); use 'simple' or 'kl'")
        if objective != "simple" and self.prediction == "v":
            raise ValueError(f"objective={objective!r} needs prediction='eps' or 'x0', got 'v'")
        if isinstance(vb_weight, bool) or not isinstance(vb_weight, (int, float)) or not 0 <= vb_weight < float("inf"):
            raise ValueError(f"vb_weight must be a finite number >= 0, got {vb_weight!r}")
        return objective

    def calc_bpd(self, x0: torch.Tensor, *, clip_denoised=True):
        """Bits per dimension of data ``x0`` (in [-1, 1]) under the model: ADM's calc_bpd_loop
        (:meth:`fastddpm.adm.GaussianDiffusion.calc_bpd_loop`, over this schedule and model, with
        the counter-based noise): a dict of "total_bpd" and "prior_bpd" [B], and "vb",
        "xstart_mse", "mse" [B, n_steps]. One model call per step, n_steps steps."""
        self._check_x("x0", x0, None)
        if self._bpd is None:
            from . import adm
            var = {"range": adm.ModelVarType.LEARNED_RANGE, "log": adm.ModelVarType.LEARNED,
                   None: adm.ModelVarType.FIXED_LARGE}[self.learned_variance]
            if self.prediction == "v":
                raise ValueError("calc_bpd needs prediction='eps' or 'x0', got 'v'")
            mean = adm.ModelMeanType.EPSILON if self.prediction == "eps" else adm.ModelMeanType.START_X
            self._bpd = adm.GaussianDiffusion(betas=self._tables64["beta"], model_mean_type=mean, model_var_type=var,
                                              loss_type=adm.LossType.MSE, noise_source="stream", backend=self.backend)
        return self._bpd.calc_bpd_loop(lambda x, t: self.eps_model(x, t), x0, clip_denoised)

    def _vlb_terms(self, impl, x0, out, t, tables, noise, seed, offset, detach_mean):
        """The per-sample [mse, vb] of the (checked) model output: one fused vlb_loss pass."""
        return ops.run_vlb_loss(impl, x0, out, t, tables["vlb"], noise, seed, offset,
                                objectives.MEAN_TYPES.index(self.prediction),
                                objectives.VARIANCE_TYPES.index(_VLB_VAR[self.learned_variance]), detach_mean)

    def _hybrid(self, terms, vb_weight):
        # mse + vb_weight * vb: one op and one node, not two selects, a mul and an add
        return torch.mv(terms, self._hybrid_coef(vb_weight, terms.dtype))

    def _hybrid_coef(self, vb_weight, dtype):
        """[1, vb_weight] on the device in ``dtype``, made once per weight (a few kept)."""
        coef = self._coefs.get((vb_weight, dtype))
        if coef is None:
            if len(self._coefs) >= 8:  # a weight that changes every step: do not keep them all
                self._coefs.clear()
            coef = self._coefs[(vb_weight, dtype)] = torch.tensor([1.0, vb_weight], dtype=dtype, device=self._device)
        return coef

    def _weights_key(self, weighting, gamma):
        """The weighting's cache key (None: unweighted), checked before anything runs."""
        if weighting is None:
            return None
        if isinstance(weighting, str):
            if weighting != "min_snr":
                raise ValueError(f"weighting must be None, 'min_snr' or a tensor of per-t weights, got {weighting!r}")
            key = ("min_snr", gamma)
            if key not in self._weights64:
                ab, omab = self._tables64["alpha_bar"], self._tables64["sqrt_1m_ab"] ** 2
                self._weights64[key] = objectives.min_snr_weights(self.prediction, ab, gamma, omab)
            return key
        return ("table", objectives.check_weights(weighting, self.n_steps))

    def _weights_on(self, key, weighting, dtype):
        """The weights of ``key`` on the tables' device in ``dtype`` (min-SNR's cached)."""
        if key[0] == "table":
            return key[1].to(self._device, dtype)
        cached = self._weights.get((key, dtype))
        if cached is None:
            cached = self._weights[(key, dtype)] = self._weights64[key].to(self._device, dtype)
        return cached

    def sampler(self, kind="ddpm", steps=None, **options):
        """A sampler over this schedule (DDPM, DDIM, DPM-Solver++, UniPC, Euler, Euler-ancestral):
        see :func:`fastddpm.samplers.make_sampler`. With a learned variance the model's output has
        2C channels: DDPM steps sample with the learned variance, the others read the mean
        channels only (as ADM's DDIM)."""
        options.setdefault("prediction", self.prediction)
        return samplers.make_sampler(self, kind, steps, **options)

    def sample(self, shape_or_x_T, **options):
        """Run a whole reverse process and return x_0: see :func:`fastddpm.samplers.sample`."""
        if options.get("sampler") is None:
            options.setdefault("prediction", self.prediction)
        return samplers.sample(self, shape_or_x_T, **options)
