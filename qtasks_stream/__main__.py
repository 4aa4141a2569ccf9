from qtasks_stream.cli import main

raise SystemExit(main())
