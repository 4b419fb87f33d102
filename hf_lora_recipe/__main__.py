import sys

from hf_lora_recipe.cli import main


sys.exit(main())
