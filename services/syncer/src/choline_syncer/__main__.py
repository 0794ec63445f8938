from choline_svc.service import main

from .main import SyncerService

main(SyncerService)
