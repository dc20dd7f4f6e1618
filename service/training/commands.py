"""``hashaudit train`` subcommands and their one-line summaries.

Kept apart from ``cli.py`` (which loads torch) so that ``hashaudit --help`` stays fast."""

TRAIN_COMMANDS = {
    "hasher": "train a hasher from command-line options and freeze it into a bundle",
    "bundle": "build a bundle from a TOML config (see configs/default_bundle.toml)",
    "generator": "train an attack generator (and the bundle's PrototypeNet) into a bundle",
    "patterns": "fit the universal patterns (per class and label-free) of a bundle's hasher",
    "generators": "fit a bundle's patterns and train all its generators from a TOML recipe "
                  "(see configs/default_generators.toml)",
    "backdoor": "one clean-label backdoor experiment: poison, retrain, t-MAP with the trigger",
}
