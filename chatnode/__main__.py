from chatnode.cli import main

raise SystemExit(main())
