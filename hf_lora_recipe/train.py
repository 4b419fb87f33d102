"""``accelerate launch -m hf_lora_recipe.train --config R.yaml``: the train command, as a module to launch."""

import sys

from hf_lora_recipe.commands.train import main


if __name__ == "__main__":
    sys.exit(main())
