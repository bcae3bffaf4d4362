"""What the Sage sandbox must already hold for the generated Stripe business.

An eCommerce platform pushed some customers and their sales orders into Sage before payment;
those Stripe charges carry ``metadata.erp_order_id`` and their customers
``metadata.sage_customer_id``. This builds exactly those Sage records from the business.
"""

from __future__ import annotations

import datetime as dt

from stripe_sage.sandbox.sage_seed import SeedCustomer, SeedLine, SeedSalesOrder
from stripe_sage.sandbox.stripe_state import StripeWorld


def sage_seed_for(world: StripeWorld) -> tuple[list[SeedCustomer], list[SeedSalesOrder]]:
    b = world.b
    customers: dict[int, SeedCustomer] = {}
    orders: list[SeedSalesOrder] = []
    for i in b.erp_charges.tolist():
        ch = world.charge(i)
        sage_id = b.sage_customer_id(ch.customer)
        assert sage_id is not None, "erp orders are placed by customers with a Sage id"
        if ch.customer not in customers:
            attrs = world._customer_attrs(ch.customer)
            customers[ch.customer] = SeedCustomer(
                customer_id=sage_id,
                name=attrs["name"][:40],  # the shop truncated it when it pushed the record
                email=attrs["email"],
                currency="USD",
                reference=world.make_id("customers", ch.customer),
            )
        day = dt.datetime.fromtimestamp(ch.created, dt.UTC).date()
        orders.append(
            SeedSalesOrder(
                order_no=b.erp_order_no(i),
                customer_id=sage_id,
                order_date=day,
                currency="USD",
                lines=[
                    SeedLine(
                        item="WEB-ORDER",
                        description="Web shop order",
                        quantity="1",
                        unit_price_minor=ch.amount,
                    )
                ],
                reference=f"web-{b.erp_order_no(i).lower()}",
            )
        )
    return list(customers.values()), orders
