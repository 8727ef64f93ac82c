from aimesh.cli import main

main()
