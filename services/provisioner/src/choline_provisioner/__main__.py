from choline_svc.service import main

from .main import ProvisionerService

main(ProvisionerService)
