"""How settings changed since runs were first written, so that old run folders and old YAML files still load.

:func:`mkd_tf.config.load_config` applies these, and only these, to what it reads:

- :data:`RENAMED`: a setting under its old name is read under its new one;
- :data:`ADDED_SINCE`: a run's ``config.yaml`` that lacks the setting was trained with the value given here;
- :data:`DEFAULTED_SINCE`: a run's ``config.yaml`` that lacks the setting takes today's default;
- :data:`REMOVED`: the setting left the product (measured not to help, benchmarks/README.md); a file that
  sets it to its off value loads without it; a config file that turns it on is refused in one line, a run
  trained with it on still evaluates, predicts and exports, but cannot be resumed.
"""

from mkd_tf.errors import fail

#: settings renamed since runs were first written: an old config file or run folder still loads
RENAMED = {("data", "target_labeled"): "target_labelled"}
#: settings added since runs were first written, with the value every run written before had
ADDED_SINCE = {
    ("segmentor", "kind"): "unet",
    ("segmentor", "domain_norm"): False,
    ("segmentor", "syn_domain_norm"): True,
    ("loss", "syn_on_target"): 0.0,  # before it existed S_syn learnt the target only by distillation
    ("alignment", "skip_kernel"): 1,
    ("loss", "structure"): 0.0,
    ("loss", "lambda_s2r_target"): 0.0,  # it existed before: runs that lack it trained without it
    ("optimizer", "lr_schedule"): "constant",
    ("alignment", "target_cycle"): True,
    ("alignment", "discriminator_every"): 1,
    ("alignment", "freeze_after_warm_start"): False,
}
#: settings added since runs were first written that an older run's config.yaml lacks and that take today's
#: default; a run's config.yaml must hold every other setting (and those of :data:`ADDED_SINCE` may be missing)
DEFAULTED_SINCE = {
    (None, "precision"),
    (None, "jit_compile"),
    (None, "deterministic"),
    (None, "checkpoint_every"),
    (None, "worker_timeout"),
    ("schedule", "mkd_pretrain"),
    ("schedule", "select_by"),
    ("alignment", "residual"),
    ("optimizer", "ema"),
    ("optimizer", "ema_momentum"),
}
#: MKD's switches removed from the product (eight, with the threshold of one), each with its off value (``None``: any value is off; the
#: threshold only mattered with pseudo-labels on). None beat the default MKD on either phantom
#: (benchmarks/README.md, "Removed switches").
REMOVED = {
    ("loss", "real_on_aligned"): 0.0,
    ("loss", "pretrain_on_target"): 0.0,
    ("loss", "average_teachers"): False,
    ("loss", "student_perturbation"): 0.0,
    ("loss", "aligned_as_target"): 0.0,
    ("loss", "real_to_generator"): 0.0,
    ("loss", "pseudo_labels"): 0.0,
    ("loss", "pseudo_label_threshold"): None,
}


def switched_on(values: dict) -> list[str]:
    """The removed settings (:data:`REMOVED`) ``values`` (a config mapping as read) turns on, dotted."""
    found = []
    for (section, key), off in REMOVED.items():
        settings = values.get(section)
        if isinstance(settings, dict) and key in settings and off is not None and settings[key] != off:
            found.append(f"{section}.{key}")
    return found


def migrate(values: dict, where, recorded: bool) -> dict:
    """``values`` (a config mapping as read from ``where``) in today's settings: renamed settings under their
    new names, the removed ones dropped, and, for a run's ``config.yaml`` (``recorded``), the settings added
    since at the value the run was trained with.

    A config file (not ``recorded``) that turns a removed setting on fails with one line naming it.
    """
    on = switched_on(values)
    if on and not recorded:
        fail(where, f"setting '{on[0]}' was removed (it did not beat the default MKD: benchmarks/README.md)")
    migrated = {}
    for section, settings in values.items():
        if not isinstance(settings, dict):
            migrated[section] = settings
            continue
        migrated[section] = {
            RENAMED.get((section, key), key): value for key, value in settings.items() if (section, key) not in REMOVED
        }
    if recorded:
        for (section, key), before in ADDED_SINCE.items():
            if isinstance(migrated.get(section), dict) and key not in migrated[section]:
                migrated[section][key] = before
    return migrated
