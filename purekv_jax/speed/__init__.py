"""``purekv bench speed``: prefill / decode speed and process peak memory of our dense cache, PureKV and PureKV
with ST-SpAttn next to transformers on the same weights and video prompts (:mod:`.model` the bench model and
prompts, :mod:`.worker` one configuration in a fresh process, :mod:`.runner` the rounds, table, JSON and plot)."""
