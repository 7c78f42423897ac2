"""anchorlearn.engine: training and evaluation pipelines on Lightning."""

from anchorlearn.models._torchvision_compat import torchvision_importable_if_installed

# Lightning and torchmetrics import torchvision whenever it is installed; a PyPI torchvision
# beside a CPU build of torch fails to import unless its missing operators are declared
# first (see anchorlearn.models._torchvision_compat). Nothing happens without torchvision.
torchvision_importable_if_installed()
