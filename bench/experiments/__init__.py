"""One-off measurements that settled a setting (the browser's playout delay, the engines' threads,
whether the embedded LM can call tools); kept to be run again when what they measured changes."""
