from csr_service.cli import main

main()
