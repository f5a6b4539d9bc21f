from .recipes import main

main()
