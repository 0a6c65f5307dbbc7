"""
Tune small, train big along the batch and the length. μP (mup.py) carries the values tuned on a
narrow, shallow proxy to a wide, deep model; a real scale-up also changes the tokens per step B
and the training tokens D. With the proxy's B0 (base_batch_tokens) and D0 (base_train_tokens)
given, `transfer` derives the run's learning rate, betas, weight decay and Adam eps from the
proxy's tuned values by the rules of docs/mup.md, "Beyond width and depth", each with its source:

- lr x (min(B, B_crit) / B0)^a: the square-root rule of Adam's SDE (Malladi et al. 2022, a = 1/2;
  measured here: 0.45 for AdamW, 0.63 for Muon),
  valid below the critical batch B_crit (McCandlish et al. 2018), above which the lr stops growing;
- lr x (D / D0)^-gamma: the optimal lr falls with the token horizon (Bjorck et al. 2024; here
  AdamW's did not, gamma = 0; Muon's did, gamma = 0.55);
- beta' = beta^(B / B0) for AdamW's beta1 and beta2 and Muon's momentum: each EMA's half-life
  held in tokens (Busbridge et al. 2023);
- eps x (B0 / B)^(1/2): the SDE's scaling of Adam's eps (Malladi et al. 2022);
- weight decay x (lr0 / lr) x (D0 / B0) / (D / B): AdamW's EMA timescale 1 / (lr x wd), in
  iterations, held as a fraction of the run's iterations (Wang & Aitchison 2024). μP's width rule
  (wd x m on hidden matrices) applies on top, per group, as before.

The exponents are settings (MEASURED: this project's value for the optimizer). At B = B0 and D = D0 (or with both base settings 0) every value is the
one given, bitwise.
"""

from typing import NamedTuple

# The exponents measured here, per optimizer: (batch, length) (docs/mup.md, "Measured here";
# results/axis_*_fit.json; muP width 128, Tiny Shakespeare, 3 seeds, 90% intervals).
# AdamW: below the critical batch the best lr grew as batch^0.455 [0.365, 0.491] (4 -> 16
# sequences at 614,400 tokens), and stopped there; along the length it did not fall (600 -> 2,400
# steps: 0.02 [-0.03, 0.03]). Muon: batch^0.63 [0.56, 0.66] over 4 -> 64 sequences; along the
# length it fell as (D / D0)^-0.55 [0.47, 0.79] over 150 -> 2,400 steps.
MEASURED_EXPONENTS = {'adamw': (0.45, 0.0), 'muon': (0.63, 0.55)}
MEASURED = -1.0 # an exponent setting's default: this project's measurement for the run's optimizer


def exponents(optimizer, batch_lr_exponent=MEASURED, length_lr_exponent=MEASURED):
    """(batch, length) exponents of a run: each as given, or where it is MEASURED, the one
    measured here for `optimizer`."""
    batch, length = MEASURED_EXPONENTS[optimizer]
    return (batch if batch_lr_exponent == MEASURED else batch_lr_exponent,
            length if length_lr_exponent == MEASURED else length_lr_exponent)


class Hyperparameters(NamedTuple):
    """The values the rules move: the proxy's as tuned, or the run's as derived."""
    learning_rate: float
    min_lr: float
    beta1: float
    beta2: float
    muon_momentum: float
    weight_decay: float
    adam_eps: float


def transfer(tuned, batch_tokens, train_tokens, base_batch_tokens=0, base_train_tokens=0,
             batch_lr_exponent=MEASURED_EXPONENTS['adamw'][0], length_lr_exponent=MEASURED_EXPONENTS['adamw'][1],
             critical_batch_tokens=0):
    """The run's Hyperparameters, from the proxy's `tuned` ones, for a run of batch_tokens tokens a
    step and train_tokens in all. A base setting of 0 is off: that axis is taken not to change.
    critical_batch_tokens = 0: no bound on the batch rule."""
    B, D = batch_tokens, train_tokens
    B0 = base_batch_tokens or B
    D0 = base_train_tokens or D
    lr_batch = B if not critical_batch_tokens else min(B, critical_batch_tokens)
    lr_factor = (lr_batch / B0) ** batch_lr_exponent * (D / D0) ** -length_lr_exponent
    learning_rate = tuned.learning_rate * lr_factor
    half_lives = B / B0 # each EMA's beta, per step, to the power of the steps per proxy step
    # the iterations of one AdamW timescale as a fraction of the run's held: wd x lr x iterations
    decay_factor = (tuned.learning_rate / learning_rate) * (D0 / B0) / (D / B)
    return Hyperparameters(
        learning_rate=learning_rate,
        min_lr=tuned.min_lr * lr_factor,
        beta1=tuned.beta1 ** half_lives,
        beta2=tuned.beta2 ** half_lives,
        muon_momentum=tuned.muon_momentum ** half_lives,
        weight_decay=tuned.weight_decay * decay_factor,
        adam_eps=tuned.adam_eps * (B0 / B) ** 0.5)


def wasted_batch(batch_tokens, critical_batch_tokens):
    """Whether a batch is past the critical batch: its steps cost tokens the lr cannot use."""
    return bool(critical_batch_tokens) and batch_tokens > critical_batch_tokens
